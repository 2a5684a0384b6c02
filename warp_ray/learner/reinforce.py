"""REINFORCE with a KL-regularized reward: plain torch, no Ray
(docs/algorithms.md#reinforce-with-a-kl-regularized-reward).

For completions y of prompts x, with per-token log-probs under the policy and the anchor:

    KL_seq(x, y) = sum_t [log pi_theta(y_t | x, y_<t) - log pi_anchor(y_t | x, y_<t)]
    r_beta(x, y) = r(x, y) - beta * KL_seq(x, y)             (a constant: no gradient)
    loss         = - mean_batch[(r_beta(x, y) - b) * sum_t log pi_theta(y_t | x, y_<t)]

b is the leave-one-out mean of r_beta over the other samples of the same prompt (RLOO)
when there are several, the batch mean, or 0. Padding tokens never count: every sum over
t is masked.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_kl(policy_logprobs: Tensor, anchor_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL_seq: the sampled-token estimate, summed over each completion's real tokens."""
    return ((policy_logprobs - anchor_logprobs) * mask).sum(-1)


def baseline(rewards: Tensor, samples_per_prompt: int, kind: str) -> Tensor:
    """b for each completion; rewards are grouped by prompt, `samples_per_prompt` consecutive ones each."""
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "rloo" and samples_per_prompt > 1:
        groups = rewards.view(-1, samples_per_prompt)
        return ((groups.sum(-1, keepdim=True) - groups) / (samples_per_prompt - 1)).reshape(-1)
    return rewards.mean().expand_as(rewards)


def reinforce_loss(
    policy_logprobs: Tensor,
    anchor_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    beta: float,
    samples_per_prompt: int,
    baseline_kind: str = "rloo",
) -> tuple[Tensor, dict[str, float]]:
    """The loss to minimise, and what to log (reward, KL to the anchor, the regularized reward), as
    tensors on the loss's device: reading them out is the caller's, once per step."""
    kl = sequence_kl(policy_logprobs.detach(), anchor_logprobs, mask)
    regularized = rewards - beta * kl
    advantage = regularized - baseline(regularized, samples_per_prompt, baseline_kind)
    loss = -(advantage * (policy_logprobs * mask).sum(-1)).mean()
    return loss, {
        "reward": rewards.mean().detach(),
        "kl_to_anchor": kl.mean().detach(),
        "regularized_reward": regularized.mean().detach(),
    }
