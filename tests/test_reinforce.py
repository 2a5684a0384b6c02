"""The REINFORCE maths of the learners, pinned by hand-computed cases and gradients."""

from __future__ import annotations

import pytest
import torch

from warp_ray.learner.reinforce import baseline, reinforce_loss, sequence_kl
from warp_ray.logprobs import token_logprobs


def test_token_logprobs_are_the_log_softmax_at_the_tokens():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 0]])
    expected = torch.stack([logits[0, 0].log_softmax(-1)[2], logits[0, 1].log_softmax(-1)[0]])
    assert torch.allclose(token_logprobs(logits, tokens)[0], expected)
    assert token_logprobs(logits.to(torch.bfloat16), tokens).dtype == torch.float32


def test_sequence_kl_ignores_padding():
    policy = torch.tensor([[-1.0, -2.0, -9.0]])
    anchor = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert sequence_kl(policy, anchor, mask).item() == pytest.approx(0.5 - 1.0)


def test_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    assert torch.allclose(baseline(rewards, 3, "rloo"), torch.tensor([2.5, 2.0, 1.5, 10.0, 10.0, 10.0]))
    assert torch.allclose(baseline(rewards, 3, "mean"), torch.full((6,), 6.0))
    assert torch.allclose(baseline(rewards, 1, "rloo"), torch.full((6,), 6.0))  # one sample: the batch mean
    assert torch.equal(baseline(rewards, 3, "none"), torch.zeros(6))


def test_gradient_is_the_reinforce_estimator_with_kl_shaped_rewards():
    policy = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    anchor = torch.tensor([[-1.0, -1.0], [-0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = torch.tensor([1.0, 3.0])
    loss, stats = reinforce_loss(policy, anchor, mask, rewards, beta=0.5, samples_per_prompt=2, baseline_kind="rloo")
    loss.backward()
    # KL: [-1, 0]; r_beta: [1.5, 3]; RLOO baselines: [3, 1.5]; advantages: [-1.5, 1.5]
    assert {k: v.item() for k, v in stats.items()} == pytest.approx(
        {"reward": 2.0, "kl_to_anchor": -0.5, "regularized_reward": 2.25}
    )
    assert torch.allclose(policy.grad, torch.tensor([[0.75, 0.75], [-0.75, 0.0]]))  # -advantage / batch, masked


def test_no_gradient_flows_through_the_kl_penalty():
    policy = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = reinforce_loss(
        policy,
        torch.tensor([[-3.0]]),
        torch.ones(1, 1),
        torch.zeros(1),
        beta=1.0,
        samples_per_prompt=1,
        baseline_kind="none",
    )
    loss.backward()
    # r_beta = -beta * KL = -2, treated as a constant: d/dlogp of -(-2 * logp) = 2
    assert policy.grad.item() == pytest.approx(2.0)
