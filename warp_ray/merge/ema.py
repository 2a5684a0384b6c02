"""The EMA anchor (WARP stage 1: docs/algorithms.md#stage-1-the-ema-anchor)."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from warp_ray.errors import MergeError
from warp_ray.merge.state_dict import check_compatible, spec_of


@torch.no_grad()
def ema_update_(ema: Mapping[str, Tensor], policy: Mapping[str, Tensor], mu: float) -> None:
    """In place, for every float tensor: ema <- (1 - mu) * ema + mu * policy.

    One fused foreach call over all tensors. Keep the EMA in float32: in bf16 a step of
    mu * (policy - ema) with mu = 0.01 is mostly below the format's resolution and lost.
    """
    if not 0.0 <= mu <= 1.0:
        raise MergeError(f"mu = {mu!r} is outside the allowed range [0, 1]")
    check_compatible([spec_of(ema), spec_of(policy)], ["ema", "policy"], same_dtype=False)
    keys = [k for k, t in ema.items() if t.is_floating_point()]
    torch._foreach_lerp_([ema[k] for k in keys], [policy[k].to(ema[k].dtype) for k in keys], mu)
