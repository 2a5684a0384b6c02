"""A learner rank's step on its device (warp_ray/learner/policy_update.py): devices made visible on
the CPU by running the step on PyTorch's `meta` device, micro-batches and chunked log-probs equal to
the one-pass computation, weights copied out as float32 CPU tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from tests.helpers import tiny_gpt2
from warp_ray.learner.policy_update import Batch, anchor_scoring_dtype, device_of, frozen, host_copy, reinforce_step
from warp_ray.logprobs import token_entropy, token_logprobs

STEP = dict(beta=0.05, temperature=0.9, samples_per_prompt=2, baseline="rloo")


def batch(rows: int = 8, length: int = 12, seed: int = 0) -> Batch:
    """Rows of random tokens, the completion from position 4 on, one row in two shorter (padding)."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(rows, length, dtype=torch.long)
    attention[::2, -3:] = 0
    completion = attention.clone()
    completion[:, :4] = 0
    return Batch(
        input_ids=torch.randint(1, 96, (rows, length), generator=g) * attention,
        attention_mask=attention,
        completion_mask=completion,
        rewards=torch.randn(rows, generator=g),
        sampled_logprobs=-torch.rand(rows, length, generator=g) * completion,
    )


def on_meta() -> GPT2LMHeadModel:
    """The tiny policy with no data, on the `meta` device (eager attention: its masks need no data)."""
    config = tiny_gpt2().config
    with torch.device("meta"):
        return GPT2LMHeadModel._from_config(config, attn_implementation="eager")


def require_inputs_on_device(model: nn.Module) -> None:
    """Fail any forward pass of `model` given a tensor that is not on the model's device: an embedding
    looks up CPU indices on any device without complaint, so the step's inputs need this check."""

    def check(module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor) and value.device != device_of(model):
                raise AssertionError(f"a {value.device} tensor fed to a model on {device_of(model)}")

    model.register_forward_pre_hook(check, with_kwargs=True)


def test_the_step_feeds_its_models_on_their_device_and_keeps_its_maths_there():
    """The batch arrives on the CPU, as from Ray's object store; policy and anchor are on `meta`,
    standing for a GPU: a tensor left on the CPU fails the hook, or mixes devices in the loss."""
    policy, anchor = on_meta(), frozen(on_meta(), torch.device("meta"))
    for model in (policy, anchor):
        require_inputs_on_device(model)
    share = batch()
    with pytest.raises(AssertionError, match="a cpu tensor fed to a model on meta"):
        policy(input_ids=share.input_ids, attention_mask=share.attention_mask)  # the check can fail
    losses = []
    stats = reinforce_step(
        policy,
        anchor,
        share,
        device_of(policy),
        losses.append,
        micro_batch_size=4,
        logprob_chunk=5,
        **STEP,
    )
    assert len(losses) == 2 and all(loss.device.type == "meta" for loss in losses)
    assert {t.device.type for t in stats.values()} == {"meta"}
    assert set(stats) == {"reward", "kl_to_anchor", "regularized_reward", "loss", "entropy", "logprob_gap"}


def test_micro_batches_and_chunked_logprobs_give_the_one_pass_gradient_and_statistics():
    def run(micro: int, chunk: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        policy, anchor = tiny_gpt2(seed=0), frozen(tiny_gpt2(seed=1), torch.device("cpu"))
        parts = 8 // micro
        stats = reinforce_step(
            policy,
            anchor,
            batch(),
            torch.device("cpu"),
            lambda loss: (loss / parts).backward(),  # the average over micro-batches, as DeepSpeed's accumulation
            micro_batch_size=micro,
            logprob_chunk=chunk,
            **STEP,
        )
        return {k: v.item() for k, v in stats.items()}, [p.grad.clone() for p in policy.parameters()]

    whole_stats, whole_grads = run(micro=8, chunk=0)
    split_stats, split_grads = run(micro=2, chunk=3)
    assert split_stats == pytest.approx(whole_stats, rel=1e-5, abs=1e-6)
    for whole, split in zip(whole_grads, split_grads):
        torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in whole_grads)


def test_the_step_keeps_no_kv_cache():
    """A forward that scores builds no KV cache (by default transformers builds one on every forward,
    which holds all layers' keys and values: on a GPU, memory that a step never uses)."""
    policy, anchor = tiny_gpt2(seed=0), frozen(tiny_gpt2(seed=1), torch.device("cpu"))
    outputs = []
    for model in (policy, anchor):
        model.register_forward_hook(lambda module, args, out: outputs.append(out))
    reinforce_step(
        policy, anchor, batch(), torch.device("cpu"), torch.Tensor.backward, micro_batch_size=4, logprob_chunk=0, **STEP
    )
    assert len(outputs) == 4 and all(out.past_key_values is None for out in outputs)


def test_a_float32_anchor_scores_in_the_dtype_it_is_given():
    """The EMA anchor is kept in float32 (mu-sized steps survive); beside a bf16 policy it scores in
    bf16, as the policy does, not in float32 (on a GPU, without bf16's tensor cores), except as a
    ZeRO-3 DeepSpeed engine, which on a GPU turns an autocast around it off."""
    expected = {("bf16", 0): torch.bfloat16, ("bf16", 1): torch.bfloat16, ("bf16", 2): torch.bfloat16}
    for precision in ("fp32", "bf16"):
        for stage in range(4):
            assert anchor_scoring_dtype(precision, stage) == expected.get((precision, stage)), (precision, stage)
    found = []
    for dtype in (torch.bfloat16, None):
        policy, anchor = tiny_gpt2(seed=0).to(torch.bfloat16), frozen(tiny_gpt2(seed=1), torch.device("cpu"))
        anchor.lm_head.register_forward_hook(lambda module, args, out: found.append(out.dtype))
        reinforce_step(
            policy,
            anchor,
            batch(),
            torch.device("cpu"),
            torch.Tensor.backward,
            micro_batch_size=8,
            logprob_chunk=0,
            anchor_dtype=dtype,
            **STEP,
        )
        assert next(anchor.parameters()).dtype == torch.float32
    assert found == [torch.bfloat16, torch.float32]


def test_micro_batches_must_hold_whole_prompts():
    with pytest.raises(ValueError, match="whole groups of 2 samples"):
        reinforce_step(
            tiny_gpt2(), tiny_gpt2(), batch(), torch.device("cpu"), print, micro_batch_size=3, logprob_chunk=0, **STEP
        )


def test_chunked_logprobs_and_entropy_equal_the_whole_computation_with_their_gradients():
    logits = torch.randn(3, 10, 50, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 10))
    weights = torch.randn(3, 10)
    grads = []
    for chunk in (0, 4):
        lp = token_logprobs(logits, tokens, temperature=0.7, chunk=chunk)
        assert lp.dtype == torch.float32
        (lp * weights).sum().backward()
        grads.append((lp.detach(), logits.grad.clone(), token_entropy(logits, 0.7, chunk)))
        logits.grad = None
    (lp0, g0, h0), (lp4, g4, h4) = grads
    torch.testing.assert_close(lp4, lp0)
    torch.testing.assert_close(g4, g0)
    torch.testing.assert_close(h4, h0)
    expected = (logits.detach().float() / 0.7).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(lp0, expected)


def test_weights_leave_as_float32_cpu_copies():
    weights = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.randn(5)}
    copies = host_copy(weights.items())
    for name, tensor in weights.items():
        assert copies[name].device.type == "cpu" and copies[name].dtype == torch.float32
        torch.testing.assert_close(copies[name], tensor.float())
        assert copies[name].data_ptr() != tensor.data_ptr()  # a copy: the rank may overwrite its own
