"""Weights as shards in Ray's object store.

A model of a WARP run (the SFT, an iteration's init, a trained policy, a merge, a point of
the LITI front) travels as a list of object references, shard j holding the same tensor
names in every model of the run (`partition`). Whoever needs a whole model (a learner's
ranks, an engine) joins the shards; the coordinator never does (see
warp_ray/coordinator/distributed_merge.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import ray
from torch import Tensor

from warp_ray.checkpoint import load_model_weights, weight_layout

Shards = list[ray.ObjectRef]
"""A model's weights: one object reference per shard, each to a dict of tensors."""

Layout = list[list[str]]
"""The tensor names each shard holds, the same for every model of a run."""


def partition(folder: Path, count: int) -> Layout:
    """The tensor names of a model folder in at most `count` shards of about equal bytes, in the
    folder's order (a tensor is never split)."""
    sizes = {name: info.dtype.itemsize * math.prod(info.shape) for name, info in weight_layout(folder).items()}
    target = sum(sizes.values()) / count
    seen = 0
    layout = [[]]
    for name, size in sizes.items():
        if seen >= target * len(layout) and len(layout) < count:
            layout.append([])
        layout[-1].append(name)
        seen += size
    return layout


def put_folder(folder: Path, layout: Layout) -> Shards:
    """A model folder's weights into the object store, shard by shard (one in memory at a time)."""
    return [ray.put(load_model_weights(folder, set(shard))) for shard in layout]


def split(state: Mapping[str, Tensor], layout: Layout) -> list[dict[str, Tensor]]:
    """A state dict cut along a layout."""
    return [{name: state[name] for name in shard} for shard in layout]


def join(shards: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A whole state dict from its shards."""
    return {name: t for shard in shards for name, t in shard.items()}


def wait_until_computed(shards: Shards) -> None:
    """Block until every shard is computed, where it lives, without fetching it here: the caller
    (the coordinator) never holds a whole model."""
    ray.wait(shards, num_returns=len(shards), fetch_local=False)
