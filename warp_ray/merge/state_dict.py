"""Run a merge over whole state dicts: key, shape and dtype checks, then tensor by tensor.

A Merge gives each tensor's coefficients: `merge(read, spans)` returns c, one per
non-reference input, and the merged tensor is ref + sum_m c_m (theta_m - ref) (see
`task_vectors`). Integer and bool tensors (buffers such as position ids) are copied from
the reference, never interpolated; float tensors come back in the reference's dtype.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.task_vectors import ReadRows, combine, row_spans

StateDict = dict[str, Tensor]
TensorSpec = tuple[tuple[int, ...], torch.dtype]
Merge = Callable[[ReadRows, Sequence[tuple[int, int]]], Tensor]
"""merge(read, spans) -> the coefficients c of one tensor (slerp_merge, average_merge, liti_merge)."""


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
                raise MergeError(f"tensor {key!r}: shape {list(other_shape)} in {name}, {list(shape)} in {ref_name}")
            if same_dtype and other_dtype != dtype:
                raise MergeError(
                    f"tensor {key!r}: dtype {other_dtype} in {name}, {dtype} in {ref_name} "
                    "(cast the models to one dtype before merging)"
                )


def merge_tensors(merge: Merge, tensors: Sequence[Tensor]) -> Tensor:
    """One merged tensor from the same tensor of every input, the reference first."""
    ref = tensors[0]
    if not ref.is_floating_point():
        return ref.clone()
    rows = [t.reshape(1) for t in tensors] if ref.dim() == 0 else tensors
    read = lambda start, stop: [t[start:stop] for t in rows]  # noqa: E731
    spans = row_spans(ref.shape)
    out = torch.empty(ref.numel(), dtype=ref.dtype)
    for _ in combine(read, spans, merge(read, spans), out=out):
        pass  # each chunk is written into out
    return out.view(ref.shape)


def merge_state_dicts(merge: Merge, state_dicts: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> StateDict:
    check_compatible([spec_of(sd) for sd in state_dicts], names)
    return {key: merge_tensors(merge, [sd[key] for sd in state_dicts]) for key in state_dicts[0]}


def model_names(count: int) -> list[str]:
    return [f"model {m + 1}" for m in range(count)]
