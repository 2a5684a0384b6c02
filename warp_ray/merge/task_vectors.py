"""The two streaming kernels every merge is made of, on one tensor of several models
(docs/algorithms.md#computing-a-merge-from-gram-matrices).

Every merge of warp-ray is `ref + sum_m c_m (theta_m - ref)`: a combination of task
vectors relative to a reference (the init for SLERP and LITI, the first model for an
average), with coefficients c that are constants (linear merges) or a function of the Gram
matrix of the task vectors (SLERP). So two kernels do all the tensor work:

    gram(read, spans)        <delta_i, delta_j>, accumulated in float64
    combine(read, spans, c)  ref + sum_m c_m delta_m, chunk by chunk, in ref's dtype

Both walk the tensor in chunks of rows, `read(start, stop)` returning those rows of every
input (reference first). Chunks keep temporaries in the CPU cache (speed) and let a folder
merge read a slice of each file at a time (memory near one chunk, not one model).
Arithmetic is float32, or float64 where float32 would overflow, so no finite input gives NaN.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

ReadRows = Callable[[int, int], Sequence[Tensor]]
"""read(start, stop): rows start:stop of every input tensor, the reference first."""

CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk and input on the CPU: 1 MiB of float32, so that a chunk of every input stays in cache."""
GPU_CHUNK_ELEMENTS = 1 << 25
"""On a GPU: 128 MiB of float32 per input, so that a chunk's kernel launches and its two waits on the
device (the Gram's values, the overflow check) are small against its traffic; a 7B model's largest
tensors are then one to four chunks, and M = 4's float32 temporaries stay near 1 GiB."""


def row_spans(shape: Sequence[int], device: str | torch.device = "cpu") -> list[tuple[int, int]]:
    """Chunks of rows (dim 0) of about CHUNK_ELEMENTS elements (GPU_CHUNK_ELEMENTS off the CPU); a
    scalar is one row."""
    rows = shape[0] if shape else 1
    row_size = max(1, int(torch.Size(shape[1:]).numel())) if shape else 1
    step = max(1, (CHUNK_ELEMENTS if torch.device(device).type == "cpu" else GPU_CHUNK_ELEMENTS) // row_size)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def chunk_gram(chunk: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    ref = chunk[0].reshape(-1).to(dtype)
    deltas = [theta.reshape(-1).to(dtype) - ref for theta in chunk[1:]]
    pairs = [(i, j) for i in range(len(deltas)) for j in range(i, len(deltas))]
    # One dot per pair of the upper triangle: about twice as fast here as stacking for a matmul.
    values = torch.stack([torch.dot(deltas[i], deltas[j]) for i, j in pairs]).tolist()
    g = [[0.0] * len(deltas) for _ in deltas]
    for (i, j), value in zip(pairs, values):
        g[i][j] = g[j][i] = value
    return torch.tensor(g, dtype=torch.float64)


def gram(read: ReadRows, spans: Sequence[tuple[int, int]]) -> Tensor:
    """The M x M Gram matrix <theta_i - ref, theta_j - ref> of one tensor, in float64."""
    total = None
    for start, stop in spans:
        chunk = read(start, stop)
        g = chunk_gram(chunk, compute_dtype(chunk[0].dtype))
        if not torch.isfinite(g).all():  # float32 overflow on huge weights
            g = chunk_gram(chunk, torch.float64)
        total = g if total is None else total + g
    return total


def linear_combination(chunk: Sequence[Tensor], c: Sequence[float], dtype: torch.dtype, out: Tensor | None) -> Tensor:
    # ref + sum_m c_m (theta_m - ref), computed as (1 - sum_m c_m) ref + sum_m c_m theta_m:
    # no task vector to materialize, and the endpoints (c = 0 or a unit vector) are exact.
    acc = torch.mul(chunk[0].reshape(-1).to(dtype), 1.0 - sum(c), out=out)
    for theta, c_m in zip(chunk[1:], c):
        acc.add_(theta.reshape(-1).to(dtype), alpha=c_m)
    return acc


def combine(read: ReadRows, spans: Sequence[tuple[int, int]], c: Tensor, out: Tensor | None = None) -> Iterator[Tensor]:
    """ref + sum_m c_m (theta_m - ref), yielded chunk by chunk (flat), in the reference's dtype.

    Given `out` (flat, the reference's dtype), the chunks are written into it and yielded as its views.
    """
    coefficients, offset = c.tolist(), 0
    for start, stop in spans:
        chunk = read(start, stop)
        size = chunk[0].numel()
        dest = (
            torch.empty(size, dtype=chunk[0].dtype, device=chunk[0].device)
            if out is None
            else out[offset : offset + size]
        )
        offset += size
        dtype = compute_dtype(dest.dtype)
        result = linear_combination(chunk, coefficients, dtype, dest if dest.dtype == dtype else None)
        # One reduction spots an inf or NaN from float32 overflow (far cheaper than isfinite().all();
        # a sum that merely overflows only costs a float64 redo).
        if not math.isfinite(result.sum()):
            result = linear_combination(chunk, coefficients, torch.float64, None)
        if result is not dest:
            dest.copy_(result)
        yield dest
