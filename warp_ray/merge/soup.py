"""Rewarded soups (Rame et al., NeurIPS 2023, arXiv 2306.04488): K policies, each fine-tuned
from one init against its own reward R_k; the trade-off sum_k lambda_k R_k chosen at deployment
as the policy theta(lambda) = sum_k lambda_k theta_k, for any lambda on the simplex, without
training again (docs/algorithms.md#rewarded-soups). SLERP of the task vectors with weights lambda
is offered beside the paper's linear interpolation."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.linear import average
from warp_ray.merge.slerp import slerp
from warp_ray.merge.state_dict import StateDict

SIMPLEX_TOLERANCE = 1e-6
"""How far from 1 the lambdas may sum: the rounding of decimal inputs such as 0.1 0.2 0.7."""


def simplex(lambdas: Sequence[float], count: int) -> list[float]:
    """lambda, checked to lie on the simplex of `count` policies: one each, each >= 0, summing to 1.
    Unlike a merge's weights, lambda is not rescaled: it names the trade-off served."""
    lambdas = [float(x) for x in lambdas]
    if len(lambdas) != count:
        raise MergeError(f"got {len(lambdas)} lambdas for {count} policies: give one lambda per policy")
    if not all(math.isfinite(x) and x >= 0 for x in lambdas):
        raise MergeError(f"lambdas {lambdas} must each be in [0, 1]")
    if abs(sum(lambdas) - 1.0) > SIMPLEX_TOLERANCE:
        raise MergeError(f"lambdas {lambdas} sum to {sum(lambdas):g}: they must sum to 1 (the simplex)")
    return lambdas


def soup(policies: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float]) -> StateDict:
    """theta(lambda) = sum_k lambda_k theta_k: the rewarded soup at lambda."""
    return average(policies, simplex(lambdas, len(policies)))


def slerp_soup(
    init: Mapping[str, Tensor], policies: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float]
) -> StateDict:
    """The soup at lambda by SLERP of the policies' task vectors relative to their shared init."""
    return slerp(init, policies, simplex(lambdas, len(policies)))
