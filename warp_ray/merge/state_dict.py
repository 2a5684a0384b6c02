"""Run a merge over whole state dicts: key, shape and dtype checks, then tensor by tensor.

A Merge gives each tensor's coefficients: `merge(read, spans)` returns c, one per
non-reference input, and the merged tensor is ref + sum_m c_m (theta_m - ref) (see
`task_vectors`). Integer and bool tensors (buffers such as position ids) are copied from
the reference, never interpolated; float tensors come back in the reference's dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.task_vectors import ReadRows, combine, gram, row_spans

StateDict = dict[str, Tensor]
TensorSpec = tuple[tuple[int, ...], torch.dtype, torch.device]
Merge = Callable[[ReadRows, Sequence[tuple[int, int]]], Tensor]
"""merge(read, spans) -> the coefficients c of one tensor (slerp_merge, average_merge, liti_merge)."""


def spec_of(state_dict: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
    return {k: (tuple(t.shape), t.dtype, t.device) for k, t in state_dict.items()}


def check_compatible(specs: Sequence[Mapping[str, TensorSpec]], names: Sequence[str], same_dtype: bool = True) -> None:
    """Raise MergeError naming the first tensor whose key, shape, dtype or device differs from names[0]'s: a
    merge computes where the weights are, and one device must hold every input of a tensor."""
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
        for key, (shape, dtype, device) in ref.items():
            other_shape, other_dtype, other_device = spec[key]
            if other_shape != shape:
                raise MergeError(f"tensor {key!r}: shape {list(other_shape)} in {name}, {list(shape)} in {ref_name}")
            if same_dtype and other_dtype != dtype:
                raise MergeError(
                    f"tensor {key!r}: dtype {other_dtype} in {name}, {dtype} in {ref_name} "
                    "(cast the models to one dtype before merging)"
                )
            if other_device != device:
                raise MergeError(
                    f"tensor {key!r}: on {other_device} in {name}, {device} in {ref_name} "
                    "(move the models to one device before merging)"
                )


def _rows(tensors: Sequence[Tensor]) -> tuple[ReadRows, list[tuple[int, int]]]:
    """The kernels' view of one tensor of every input: read(start, stop) and the row chunks."""
    rows = [t.reshape(1) for t in tensors] if tensors[0].dim() == 0 else tensors
    return (lambda start, stop: [t[start:stop] for t in rows]), row_spans(tensors[0].shape, tensors[0].device)


def _given(read: ReadRows, spans: Sequence[tuple[int, int]], c: Tensor) -> Tensor:
    return c


def given(c: Tensor) -> Merge:
    """The Merge whose coefficients are `c` whatever the tensor (LITI, averages, precomputed SLERP)."""
    return partial(_given, c=c)


def merge_tensors(merge: Merge, tensors: Sequence[Tensor]) -> Tensor:
    """One merged tensor from the same tensor of every input, the reference first."""
    ref = tensors[0]
    if not ref.is_floating_point():
        return ref.clone()
    read, spans = _rows(tensors)
    out = torch.empty(ref.numel(), dtype=ref.dtype, device=ref.device)
    for _ in combine(read, spans, merge(read, spans), out=out):
        pass  # each chunk is written into out
    return out.view(ref.shape)


def merge_state_dicts(merge: Merge, state_dicts: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> StateDict:
    check_compatible([spec_of(sd) for sd in state_dicts], names)
    return {key: merge_tensors(merge, [sd[key] for sd in state_dicts]) for key in state_dicts[0]}


# A merge split across processes (the coordinator's): the Gram matrices are computed where the
# weights are, the coefficients in one place, and the combination where the weights are again.
# Inputs may differ in dtype (float32 policies, a bfloat16 init): the result has the init's.


def _check_task_vector_inputs(init: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]]) -> None:
    check_compatible([spec_of(sd) for sd in (init, *models)], ["init", *model_names(len(models))], same_dtype=False)


def task_vector_grams(init: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per floating-point tensor, the M x M Gram matrix <theta_i - init, theta_j - init> (float64)."""
    _check_task_vector_inputs(init, models)
    return {key: gram(*_rows([t, *(m[key] for m in models)])) for key, t in init.items() if t.is_floating_point()}


def combine_task_vectors(
    init: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], coefficients: Mapping[str, Tensor]
) -> StateDict:
    """init + sum_m c_m (theta_m - init) per tensor, c = coefficients[name]; integer tensors from the init."""
    _check_task_vector_inputs(init, models)
    return {key: merge_tensors(given(coefficients.get(key)), [t, *(m[key] for m in models)]) for key, t in init.items()}


def model_names(count: int) -> list[str]:
    return [f"model {m + 1}" for m in range(count)]
