"""A learner rank's work on its device, in torch and transformers only: no Ray, no DeepSpeed, no
pydantic, so that it runs as it is wherever torch does (bench/gpu_check.py runs it on a GPU).

The rank (rank.py) wraps it: DeepSpeed's engine is the `policy` it calls and the `backward` it
is given. Every tensor here names its device: the batch arrives on the CPU (Ray's object store
holds CPU tensors) and is moved to the policy's device; weights leave as float32 CPU copies.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from warp_ray.learner.reinforce import reinforce_loss
from warp_ray.logprobs import token_entropy, token_logprobs

LanguageModel = Callable[..., object]
"""A causal LM, or DeepSpeed's engine around one: called with input_ids and attention_mask, returns .logits."""


@dataclass(frozen=True)
class Batch:
    """A rank's share of a step: right-padded prompt + completion rows, their attention mask, a mask
    of the completion tokens, one reward per row, and the log-probs the rollout engine sampled the
    completion tokens with (in place, zero elsewhere). Rows come in groups of one prompt's samples."""

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    rewards: Tensor
    sampled_logprobs: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def __len__(self) -> int:
        return len(self.rewards)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def anchor_scoring_dtype(precision: str, zero_stage: int) -> torch.dtype | None:
    """The dtype a float32 anchor scores in: the policy's bf16 when it trains in bf16, as a module of
    its own (ZeRO 0-2). The anchor is stored in float32, so that EMA steps of mu * (policy - ema) are
    not rounded away; scoring in float32 too leaves a GPU's bf16 tensor cores idle (7.1-7.7x slower
    at Llama-2-7B's widths on an H200: docs/benchmarks.md). Under ZeRO-3 the anchor is a DeepSpeed
    engine, which on a GPU turns an autocast around it off, and whose own `torch_autocast` would gather its
    shards in bf16: there it scores in float32 (None: its own dtype)."""
    return torch.bfloat16 if precision == "bf16" and zero_stage < 3 else None


def scoring_precision(dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager:
    """Where a model scores without gradients: under autocast to `dtype` on `device` (None: in its own dtype)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """A model that only scores (the KL anchor, a reference), on `device`, in eval mode, without gradients."""
    return model.to(device).eval().requires_grad_(False)


def reinforce_step(
    policy: LanguageModel,
    anchor: LanguageModel,
    batch: Batch,
    device: torch.device,
    backward: Callable[[Tensor], None],
    *,
    beta: float,
    temperature: float,
    samples_per_prompt: int,
    baseline: str,
    micro_batch_size: int,
    logprob_chunk: int,
    anchor_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """One REINFORCE step's forward and backward passes over `batch`, `micro_batch_size` rows at a
    time (whole prompts' groups, so the leave-one-out baseline stays within a prompt), on `device`.
    `backward(loss)` runs once per micro-batch, its loss the mean over the micro-batch's rows: the
    caller averages the gradients over micro-batches and steps the optimizer after the last
    (DeepSpeed does both with gradient accumulation). Returns the step's statistics as tensors on
    `device`, means over rows (per completion token for entropy and logprob_gap)."""
    if micro_batch_size % samples_per_prompt or len(batch) % micro_batch_size:
        raise ValueError(
            f"a micro-batch of {micro_batch_size} rows must hold whole groups of {samples_per_prompt} samples "
            f"and divide the rank's {len(batch)} rows"
        )
    batch = batch.to(device)
    parts = [batch.rows(i, i + micro_batch_size) for i in range(0, len(batch), micro_batch_size)]
    totals: dict[str, Tensor] = {}
    for part in parts:
        for key, value in _micro_step(
            policy, anchor, part, backward, beta, temperature, samples_per_prompt, baseline, logprob_chunk, anchor_dtype
        ).items():
            totals[key] = totals.get(key, 0) + value
    tokens = totals.pop("tokens").clamp(min=1)
    stats = {k: v / len(parts) for k, v in totals.items() if k not in ("entropy", "logprob_gap")}
    return {**stats, "entropy": totals["entropy"] / tokens, "logprob_gap": totals["logprob_gap"] / tokens}


def _micro_step(
    policy: LanguageModel,
    anchor: LanguageModel,
    batch: Batch,
    backward: Callable[[Tensor], None],
    beta: float,
    temperature: float,
    samples_per_prompt: int,
    baseline: str,
    logprob_chunk: int,
    anchor_dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    # The policy and its anchor at the sampling temperature, as the engine sampled: the gradient is
    # then the sampled policy's, and KL_seq is KL(pi_T || anchor_T).
    tokens = batch.input_ids[:, 1:]
    # No KV cache: a forward that scores has no use for one, which holds every layer's keys and values
    # to the end of the forward (without gradients, past the point where each layer's would be freed).
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    logits = policy(**inputs).logits[:, :-1]
    log_pi = token_logprobs(logits, tokens, temperature, logprob_chunk)
    with torch.no_grad():
        entropy = token_entropy(logits.detach(), temperature, logprob_chunk)
        with scoring_precision(anchor_dtype, logits.device):
            anchor_logits = anchor(**inputs).logits[:, :-1]
        log_anchor = token_logprobs(anchor_logits, tokens, temperature, logprob_chunk)
    del logits, anchor_logits
    mask = batch.completion_mask[:, 1:].float()
    loss, stats = reinforce_loss(log_pi, log_anchor, mask, batch.rewards, beta, samples_per_prompt, baseline)
    backward(loss)
    # Engine against learner on the sampled tokens: ~0 on policy in float32; grows with sync_every or bf16.
    gap = (log_pi.detach() - batch.sampled_logprobs[:, 1:]).abs()
    return {
        **stats,
        "loss": loss.detach(),
        "tokens": mask.sum(),
        "entropy": (entropy * mask).sum(),
        "logprob_gap": (gap * mask).sum(),
    }


@torch.no_grad()
def greedy(
    model: nn.Module, prompt_ids: Sequence[list[int]], max_new_tokens: int, synced_gpus: bool
) -> list[list[int]]:
    """Greedy completions (token ids), one prompt at a time (no padding). synced_gpus: under ZeRO-3,
    where every rank must run every forward."""
    config, device, training = model.config, device_of(model), model.training
    model.eval()  # a model in training mode with activation checkpointing decodes without its KV cache
    completions = []
    try:
        for ids in prompt_ids:
            out = model.generate(
                torch.tensor([ids], device=device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                synced_gpus=synced_gpus,
                pad_token_id=config.pad_token_id,
                eos_token_id=config.eos_token_id,
            )
            completions.append(out[0, len(ids) :].tolist())
    finally:
        model.train(training)
    return completions


def host_copy(tensors: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """float32 copies on the CPU, one tensor at a time (each may be a ZeRO-3 gather, valid only until
    the next), from a GPU through one pinned staging buffer, reused: what enters Ray's object store
    must deserialise in a process without a GPU, and must not land on a GPU that a rank or an engine
    owns; pinning every copy would hold the whole model in page-locked memory."""
    copies, staging = {}, torch.empty(0, dtype=torch.uint8)
    for name, tensor in tensors:
        tensor = tensor.detach()
        if tensor.is_cuda:
            nbytes = tensor.numel() * tensor.element_size()
            if staging.numel() < nbytes:
                staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            tensor = staging[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        copies[name] = torch.empty(tensor.shape, dtype=torch.float32).copy_(tensor)
    return copies
