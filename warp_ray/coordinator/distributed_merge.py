"""WARP's merges on sharded weights (warp_ray/shards.py), computed where the weights live.

A merge is linear in the task vectors, with coefficients from the per-tensor Gram matrices
(warp_ray.merge): only those M x M matrices need to meet in the coordinator.

    G_j      = <theta_m,j - init_j, theta_m',j - init_j>, per tensor     on learner j
    c        = slerp_coefficients(G, weights), per tensor                 the coordinator
    merged_j = init_j + sum_m c_m (theta_m,j - init_j)                    on learner j

Shard j's work runs in learner j's process (`Learner.apply`: on its node, in a process that has
torch loaded already), which pulls shard j of every policy, as a reduce-scatter would; its result
stays in the object store there. The coordinator holds references and Gram matrices, never a
model. Without learners (a benchmark, a test) the work runs as plain Ray tasks.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import ray
from torch import Tensor

from warp_ray import merge
from warp_ray.shards import Shards

Hosts = Optional[Sequence[ray.actor.ActorHandle]]
"""The learners: shard j's work runs on learner j (mod their number)."""


@ray.remote(num_cpus=0)
def _call(fn: Callable, *args):
    return fn(*args)


def _on(hosts: Hosts, j: int, fn: Callable, *args) -> ray.ObjectRef:
    return hosts[j % len(hosts)].apply.remote(fn, *args) if hosts else _call.remote(fn, *args)


def _grams(init: dict, *models: dict) -> dict[str, Tensor]:
    return merge.task_vector_grams(init, models)


def _combine(init: dict, coefficients: dict[str, Tensor], *models: dict) -> dict[str, Tensor]:
    return merge.combine_task_vectors(init, models, coefficients)


def slerp(
    init: Shards, models: Sequence[Shards], weights: Optional[Sequence[float]] = None, hosts: Hosts = None
) -> Shards:
    """SLERP of the models' task vectors relative to `init`, per tensor (warp_ray.merge.slerp)."""
    parts = [[model[j] for model in models] for j in range(len(init))]
    grams = ray.get([_on(hosts, j, _grams, init[j], *parts[j]) for j in range(len(init))])
    coefficients = [{name: merge.slerp_coefficients(g, weights) for name, g in shard.items()} for shard in grams]
    return [_on(hosts, j, _combine, init[j], coefficients[j], *parts[j]) for j in range(len(init))]


def liti(base: Shards, merged: Shards, eta: float, hosts: Hosts = None) -> Shards:
    """(1 - eta) * base + eta * merged, shard by shard (warp_ray.merge.liti)."""
    return [_on(hosts, j, merge.liti, b, m, eta) for j, (b, m) in enumerate(zip(base, merged))]
