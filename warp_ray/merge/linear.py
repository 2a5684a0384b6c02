"""Linear merges: weighted averages of weights (WARM, model soups, LERP) and LITI."""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping, Sequence

from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.state_dict import StateDict, merge_state_dicts, model_names


def linear_combination(tensors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """sum_m coefficients[m] * tensors[m]."""
    out = tensors[0] * coefficients[0]
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        out.add_(tensor, alpha=coefficient)
    return out


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


def average(models: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> StateDict:
    """Weighted average of whole weights: sum_m w_m theta_m / sum_m w_m (uniform when None).

    This is WARM's `phi = (1/M) sum_i phi_i`, a model soup, and also LERP of task vectors:
    with weights summing to 1, init + sum_m w_m (theta_m - init) = sum_m w_m theta_m.
    """
    if not models:
        raise MergeError("average needs at least one model")
    coefficients = normalized_weights(weights, len(models))
    return merge_state_dicts(partial(linear_combination, coefficients=coefficients), models, model_names(len(models)))


def check_eta(eta: float) -> float:
    if not 0.0 <= eta <= 1.0:  # also rejects NaN
        raise MergeError(f"eta = {eta!r} is outside the allowed range [0, 1]")
    return float(eta)


def liti(init: Mapping[str, Tensor], merged: Mapping[str, Tensor], eta: float) -> StateDict:
    """Linear interpolation towards the initialization: (1 - eta) * init + eta * merged."""
    eta = check_eta(eta)
    return merge_state_dicts(partial(linear_combination, coefficients=(1.0 - eta, eta)), [init, merged], ["init", "merged"])
