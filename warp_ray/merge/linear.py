"""Linear merges: weighted averages of weights (WARM, model soups, LERP) and LITI
(docs/algorithms.md#stage-3-liti-and-the-kl-reward-front)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.state_dict import Merge, StateDict, given, merge_state_dicts, model_names


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Non-negative weights, one per model, scaled to sum to 1 (uniform when None)."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise MergeError(f"got {len(weights)} weights for {count} models: give one weight per model")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"weights {weights} must be finite, >= 0, and not all 0")
    total = sum(weights)
    return [w / total for w in weights]


def average_merge(count: int, weights: Sequence[float] | None = None) -> Merge:
    """sum_m w_m theta_m = theta_1 + sum_{m>1} w_m (theta_m - theta_1), the weights summing to 1."""
    w = normalized_weights(weights, count)
    return given(torch.tensor(w[1:], dtype=torch.float64))


def liti_merge(eta: float) -> Merge:
    """(1 - eta) init + eta merged = init + eta (merged - init)."""
    if not 0.0 <= eta <= 1.0:  # also rejects NaN
        raise MergeError(f"eta = {eta!r} is outside the allowed range [0, 1]")
    return given(torch.tensor([float(eta)], dtype=torch.float64))


def average(models: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted average of whole weights: sum_m w_m theta_m / sum_m w_m (uniform when None).

    This is WARM's `phi = (1/M) sum_i phi_i`, a model soup, and also LERP of task vectors:
    with weights summing to 1, init + sum_m w_m (theta_m - init) = sum_m w_m theta_m.
    Integer and bool tensors come from the first model.
    """
    if not models:
        raise MergeError("average needs at least one model")
    return merge_state_dicts(average_merge(len(models), weights), models, model_names(len(models)))


def liti(init: Mapping[str, Tensor], merged: Mapping[str, Tensor], eta: float) -> StateDict:
    """Linear interpolation towards the initialization: (1 - eta) * init + eta * merged."""
    return merge_state_dicts(liti_merge(eta), [init, merged], ["init", "merged"])
