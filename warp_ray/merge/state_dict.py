"""Apply a per-tensor merge to whole state dicts: key checks, dtype rules, compute precision.

A merge function takes a list of same-shape float tensors (the first is the reference:
`init`, or the first model of an average) and returns one tensor. This module applies it
key by key, in float32 or better, returns the reference's dtype, and copies integer and
bool tensors (buffers such as position ids) from the reference instead of interpolating.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from warp_ray.errors import MergeError

StateDict = dict[str, Tensor]
TensorSpec = tuple[tuple[int, ...], torch.dtype]
MergeFn = Callable[[list[Tensor]], Tensor]


def spec_of(state_dict: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
    return {k: (tuple(t.shape), t.dtype) for k, t in state_dict.items()}


def check_compatible(
    specs: Sequence[Mapping[str, TensorSpec]], names: Sequence[str], same_dtype: bool = True
) -> None:
    """Raise MergeError naming the first tensor whose key, shape or dtype differs from names[0]'s."""
    ref, ref_name = specs[0], names[0]
    for spec, name in zip(specs[1:], names[1:]):
        missing, extra = sorted(ref.keys() - spec.keys()), sorted(spec.keys() - ref.keys())
        if missing or extra:
            raise MergeError(
                f"{name} and {ref_name} hold different tensors: "
                + "; ".join(
                    f"{what} {', '.join(repr(k) for k in keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for what, keys in ((f"missing from {name}:", missing), (f"only in {name}:", extra))
                    if keys
                )
            )
        for key, (shape, dtype) in ref.items():
            other_shape, other_dtype = spec[key]
            if other_shape != shape:
                raise MergeError(
                    f"tensor {key!r}: shape {list(other_shape)} in {name}, {list(shape)} in {ref_name}"
                )
            if same_dtype and other_dtype != dtype:
                raise MergeError(
                    f"tensor {key!r}: dtype {other_dtype} in {name}, {dtype} in {ref_name} "
                    "(cast the models to one dtype before merging)"
                )


def merge_tensor(fn: MergeFn, tensors: Sequence[Tensor]) -> Tensor:
    """fn on the tensors in float32 (or float64 if stored so), returned in tensors[0]'s dtype."""
    ref = tensors[0]
    if not ref.is_floating_point():
        return ref.clone()
    compute = torch.promote_types(ref.dtype, torch.float32)
    return fn([t.to(compute) for t in tensors]).to(ref.dtype)


def merge_state_dicts(fn: MergeFn, state_dicts: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> StateDict:
    check_compatible([spec_of(sd) for sd in state_dicts], names)
    return {key: merge_tensor(fn, [sd[key] for sd in state_dicts]) for key in state_dicts[0]}


def model_names(count: int) -> list[str]:
    return [f"model {m + 1}" for m in range(count)]
