"""SLERP of task vectors, per tensor (WARP stage 2: docs/algorithms.md#stage-2-slerp-of-task-vectors).

For M = 2, with delta_m = theta_m - init and cos(Omega) = <delta_1, delta_2> / (|delta_1| |delta_2|):

    slerp(init, theta_1, theta_2, lam) = init + sin((1 - lam) Omega) / sin(Omega) * delta_1
                                              + sin(lam Omega) / sin(Omega) * delta_2

For M > 2 the pair formula is applied recursively: the merge of the first m - 1 task vectors
is slerped with delta_m at lambda_m = w_m / (w_1 + ... + w_m) (1/m for uniform weights).
Every step is a linear combination of the deltas, so the result is init + sum_m c_m delta_m
with c a function of the Gram matrix G_ij = <delta_i, delta_j> alone: `slerp_coefficients`
computes c from G, and a distributed merge needs only G to meet in one place.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping, Sequence

import torch
from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.linear import normalized_weights
from warp_ray.merge.state_dict import Merge, StateDict, merge_state_dicts, model_names
from warp_ray.merge.task_vectors import ReadRows, gram

COLINEAR = 1.0 - 1e-6
"""|cos Omega| above this: the pair is colinear and SLERP falls back to linear interpolation."""


def pair_coefficients(lam: float, vv: float, dd: float, vd: float) -> tuple[float, float]:
    """(a, b) with slerp(v, d, lam) = a v + b d, from |v|^2, |d|^2 and <v, d>.

    A zero vector or a colinear pair has no plane to rotate in: linear interpolation
    with the same lam, (1 - lam) v + lam d.
    """
    if vv > 0.0 and dd > 0.0:
        cos = vd / math.sqrt(vv * dd)
        if abs(cos) <= COLINEAR:
            omega = math.acos(cos)
            return math.sin((1.0 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega)
    return 1.0 - lam, lam


def slerp_coefficients(gram: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """c (float64, one per model) with slerp(init, models, weights) = init + sum_m c_m delta_m.

    gram: the M x M matrix <delta_i, delta_j> of one tensor. weights: one per model,
    non-negative, not all 0 (uniform when None).
    """
    g = gram.to(torch.float64)
    w = normalized_weights(weights, g.shape[0])
    c = torch.zeros(g.shape[0], dtype=torch.float64)
    seen = 0.0
    for m, w_m in enumerate(w):
        seen += w_m
        if seen == 0.0:
            continue  # leading zero weights: nothing merged yet
        a, b = pair_coefficients(w_m / seen, float(c @ g @ c), float(g[m, m]), float(c @ g[:, m]))
        c *= a
        c[m] = b
    return c


def _slerp_of_gram(read: ReadRows, spans: Sequence[tuple[int, int]], weights: Sequence[float] | None) -> Tensor:
    return slerp_coefficients(gram(read, spans), weights)


def slerp_merge(count: int, weights: Sequence[float] | None = None) -> Merge:
    """SLERP of `count` models as a Merge: each tensor's coefficients come from its Gram matrix."""
    normalized_weights(weights, count)  # fail on bad weights before touching a tensor
    return partial(_slerp_of_gram, weights=weights)


def slerp(
    init: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> StateDict:
    """Per-tensor SLERP of the task vectors of `models` relative to `init` (see the module doc).

    weights=None is the paper's uniform merge; for M = 2, weights=(1 - lam, lam) is
    slerp(init, theta_1, theta_2, lam).
    """
    if not models:
        raise MergeError("slerp needs at least one model")
    return merge_state_dicts(slerp_merge(len(models), weights), [init, *models], ["init", *model_names(len(models))])
