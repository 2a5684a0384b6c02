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


def partition(folder: Path, count: int) -> list[list[str]]:
    """The tensor names of a model folder in at most `count` shards of about equal bytes, in the
    folder's order (a tensor is never split)."""
    sizes = {name: info.dtype.itemsize * math.prod(info.shape) for name, info in weight_layout(folder).items()}
    target, seen, names = sum(sizes.values()) / count, 0, [[]]
    for name, size in sizes.items():
        if seen >= target * len(names) and len(names) < count:
            names.append([])
        names[-1].append(name)
        seen += size
    return names


def put_folder(folder: Path, names: Sequence[Sequence[str]]) -> Shards:
    """A model folder's weights into the object store, shard by shard (one in memory at a time)."""
    return [ray.put(load_model_weights(folder, set(shard))) for shard in names]


def split(state: Mapping[str, Tensor], names: Sequence[Sequence[str]]) -> list[dict[str, Tensor]]:
    """A state dict cut along a partition."""
    return [{name: state[name] for name in shard} for shard in names]


def join(shards: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """A whole state dict from its shards."""
    return {name: t for shard in shards for name, t in shard.items()}
