"""Rewarded soups (Rame et al., NeurIPS 2023, arXiv 2306.04488): K policies, each fine-tuned
from one init against its own reward R_k; the trade-off sum_k lambda_k R_k chosen at deployment
as the policy theta(lambda) = sum_k lambda_k theta_k, for any lambda on the simplex, without
training again (docs/algorithms.md#rewarded-soups). SLERP of the task vectors with weights lambda
is offered beside the paper's linear interpolation."""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.linear import average
from warp_ray.merge.slerp import slerp
from warp_ray.merge.state_dict import StateDict

SIMPLEX_TOLERANCE = 1e-4
"""How far from 1 the lambdas may sum: thirds typed as 0.3333 pass (the merge then divides by their sum)."""


def simplex(lambdas: Sequence[float], count: int) -> list[float]:
    """lambda, checked to lie on the simplex of `count` policies: one each, each >= 0, summing to 1.
    Unlike a merge's weights, lambdas off the simplex are refused, not rescaled: they name the
    trade-off served."""
    lambdas = [float(x) for x in lambdas]
    if count < 1:
        raise MergeError("a soup needs at least one policy")
    if len(lambdas) != count:
        raise MergeError(f"got {len(lambdas)} lambdas for {count} policies: give one lambda per policy")
    for k, x in enumerate(lambdas, 1):
        if not (math.isfinite(x) and x >= 0):
            raise MergeError(f"lambdas {lambdas}: lambda_{k} = {x} must be a finite number >= 0")
    if abs(sum(lambdas) - 1.0) > SIMPLEX_TOLERANCE:
        raise MergeError(f"lambdas {lambdas} sum to {sum(lambdas):.10g}: they must sum to 1 (the simplex)")
    return lambdas


def soup(policies: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float]) -> StateDict:
    """theta(lambda) = sum_k lambda_k theta_k: the rewarded soup at lambda."""
    return average(policies, simplex(lambdas, len(policies)))


def slerp_soup(
    init: Mapping[str, Tensor], policies: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float]
) -> StateDict:
    """The soup by SLERP of the policies' task vectors relative to their shared init, lambda as
    SLERP's weights (docs/algorithms.md#rewarded-soups: not the same point as the linear soup's)."""
    return slerp(init, policies, simplex(lambdas, len(policies)))


def simplex_grid(count: int, steps: int, interior: bool = False) -> list[tuple[float, ...]]:
    """Every lambda on the simplex of `count` policies whose coordinates are multiples of 1/steps,
    from the first policy's vertex on (two policies, 10 steps: (1, 0), (0.9, 0.1), ..., (0, 1));
    `interior`: only those with no coordinate 0."""
    low = 1 if interior else 0
    points = (p for p in itertools.product(range(low, steps + 1), repeat=count) if sum(p) == steps)
    return [tuple(k / steps for k in p) for p in sorted(points, reverse=True)]
