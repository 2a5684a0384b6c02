"""The memory a learner rank needs on its GPU, estimated from the config and the model's own config
before anything starts (docs/gpu.md#the-memory-model), so that a run that cannot fit is refused in
seconds, with its numbers, rather than failing at its first step on a cluster.

For P parameters, K ranks and ZeRO stage Z, with b bytes per training value (2 in bf16, 4 in fp32):

    weights       b P            / K if Z = 3
    gradients     b P            / K if Z >= 2
    optimizer     16 P in bf16 (float32 master weights, their gradients, Adam's two moments),
                  8 P in fp32 (Adam's two moments)                                         / K if Z >= 1
    anchor        4 P (float32, so that EMA steps are not rounded away)                    / K if Z = 3
    activations   tokens x layers x b (h + ffn-sized terms): each layer's input kept and one layer
                  recomputed with activation checkpointing; every layer's b (8 h + 4 ffn) without
    logits        tokens x V x (3 b + 4) (the policy's, two buffers of their gradient, the anchor's
                  counted in float32) + 3 x rows x chunk x V x 4 (one chunk's float32 log-softmax, its exp, the entropy)
    gathered      under ZeRO-3, the largest weight whole, the policy's, its gradient and the anchor's: W (2 b + 4)
    sync          with a colocated engine (resources.colocate), what its in-memory sync holds: a layer's weights
                  copied in the engine's dtype and vLLM's rebuilt copy of them, 2 b max(W, P / layers)
    overhead      3 GB: CUDA context, NCCL buffers, allocator fragmentation (an allowance, not a measure)

where tokens = micro-batch rows x (longest prompt + warp.max_new_tokens). It is an estimate, checked
against a measured peak by bench/gpu_check.py where a GPU is lent.

A worker of a WARM fine-tune (`warm_worker_memory`) is the same sum with K = warm.workers_per_rm,
its ZeRO stage and precision, rows = both sides of its share of the pairs and no anchor or
logits (one score per sequence). Under ZeRO-3 its gathered part is the larger of the largest
weight and its gradient, 2 b W, and the rest of the model, b P (K - 1) / K, which every worker
gathers whole for rank 0 to save it at the end (counted beside the last step's activations:
an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PretrainedConfig

from warp_ray.checkpoint import meta_model
from warp_ray.errors import ConfigError

if TYPE_CHECKING:  # the estimate itself needs no pydantic: bench/gpu_check.py runs it where there is none
    from warp_ray.config import WarpConfig

GB = 1e9
OVERHEAD_BYTES = 3 * GB


def model_size(model_config: PretrainedConfig, trust_remote_code: bool = False) -> tuple[int, int]:
    """The model's parameters (tied ones once) and its largest weight's, counted on PyTorch's meta
    device: no memory, no weights."""
    sizes = [p.numel() for p in meta_model(model_config, trust_remote_code).parameters()]
    return sum(sizes), max(sizes)


@dataclass(frozen=True)
class RankMemory:
    """Bytes a learner rank needs, by part, for a model of `parameters`."""

    parts: dict[str, float]
    parameters: int

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def __str__(self) -> str:
        return (
            " + ".join(f"{name} {size / GB:.1f}" for name, size in self.parts.items() if size)
            + f" = {self.total / GB:.1f} GB"
        )


def rank_bytes(
    model_config: PretrainedConfig,
    parameters: int,
    largest: int,
    *,
    ranks: int,
    zero_stage: int,
    bf16: bool,
    rows: int,
    sequence: int,
    logprob_chunk: int,
    activation_checkpointing: bool,
    causal_lm: bool = True,
) -> RankMemory:
    """The estimate above: `rows` completions of up to `sequence` tokens per pass; without
    `causal_lm`, a reward model's: no anchor, no logits."""
    P, K, Z, b = parameters, ranks, zero_stage, 2 if bf16 else 4
    h = model_config.hidden_size
    ffn = getattr(model_config, "intermediate_size", None) or 4 * h
    layers, vocab = model_config.num_hidden_layers, model_config.vocab_size
    tokens = rows * sequence
    per_layer = b * (8 * h + 4 * ffn)
    activations = tokens * (layers * b * h + per_layer if activation_checkpointing else layers * per_layer)
    chunk = min(logprob_chunk or sequence, sequence)
    gathered = largest * (2 * b + 4) if causal_lm else max(2 * b * largest, b * P * (K - 1) / K)
    return RankMemory(
        {
            "weights": b * P / (K if Z == 3 else 1),
            "gradients": b * P / (K if Z >= 2 else 1),
            "optimizer": (16 if bf16 else 8) * P / (K if Z >= 1 else 1),
            "anchor": 4 * P / (K if Z == 3 else 1) if causal_lm else 0,
            "activations": activations,
            "logits": tokens * vocab * (3 * b + 4) + 3 * rows * chunk * vocab * 4 if causal_lm else 0,
            "gathered": gathered if Z == 3 else 0,
            "overhead": OVERHEAD_BYTES,
        },
        P,
    )


def rank_memory(config: WarpConfig, model_config: PretrainedConfig, prompt_tokens: int) -> RankMemory:
    """The estimate for a config's learner rank, prompts of up to `prompt_tokens` tokens."""
    r = config.resources
    parameters, largest = model_size(model_config, config.paths.trust_remote_code)
    estimate = rank_bytes(
        model_config,
        parameters,
        largest,
        ranks=r.ranks_per_learner,
        zero_stage=r.zero_stage,
        bf16=r.precision == "bf16",
        rows=config.micro_batch_size,
        sequence=prompt_tokens + config.warp.max_new_tokens,
        logprob_chunk=r.logprob_chunk,
        activation_checkpointing=r.activation_checkpointing,
    )
    if r.colocate:
        layer = max(largest, parameters / model_config.get_text_config().num_hidden_layers)
        estimate.parts["sync"] = 2 * (2 if r.precision == "bf16" else 4) * layer
    return estimate


def check_fits(config: WarpConfig, model_config: PretrainedConfig, prompt_tokens: int) -> RankMemory:
    """The estimate; ConfigError naming its parts if a rank on a GPU would need more than its share
    of the GPU (resources.gpus_per_rank of it, less a colocated engine's share) has,
    or if an engine's share of a GPU cannot hold the policy's weights (vLLM needs room beyond them
    for its KV cache, which it sizes itself and refuses to start without)."""
    estimate = rank_memory(config, model_config, prompt_tokens)
    r = config.resources
    engine_gpus = r.gpus_per_engine
    gpus_key = "gpus_per_rank" if r.colocate else "gpus_per_rollout_worker"
    engine_share = engine_gpus * r.engine_memory_utilization * (r.gpu_memory_gb or 0) * GB
    engine_weights = estimate.parameters * (2 if r.precision == "bf16" else 4)
    if engine_gpus > 0 and engine_weights >= engine_share:
        raise ConfigError(
            f"a vLLM engine's share of a GPU, {engine_share / GB:.1f} GB (resources.{gpus_key} = "
            f"{engine_gpus} x engine_memory_utilization = {r.engine_memory_utilization} x gpu_memory_gb "
            f"= {r.gpu_memory_gb}), cannot hold the policy's {engine_weights / GB:.1f} GB of weights and a KV cache"
        )
    if r.gpus_per_rank > 0:
        available = r.gpus_per_rank * r.gpu_memory_gb * GB - (engine_share if r.colocate else 0)
        if estimate.total > available:
            share = (
                "a GPU" if r.gpus_per_rank == 1 else f"its share of a GPU (resources.gpus_per_rank = {r.gpus_per_rank})"
            )
            # More ranks shard the state at ZeRO-3, on whole GPUs: the config refuses a shared GPU to more than one.
            levers = "more resources.ranks_per_learner at zero_stage 3, " if r.gpus_per_rank == 1 else ""
            if r.colocate:
                share += (
                    f" less its colocated engine's {engine_share / GB:.1f} GB (resources.engine_memory_utilization)"
                )
                levers = "a lower resources.engine_memory_utilization, " + levers
            raise ConfigError(
                f"a learner rank would need about {estimate.total / GB:.1f} GB of GPU memory, over the "
                f"{available / GB:.1f} GB of {share} (resources.gpu_memory_gb = {r.gpu_memory_gb}) "
                f"({estimate}; {estimate.parameters / 1e9:.2f}B parameters, "
                f"{config.micro_batch_size} completions of up to {prompt_tokens} + {config.warp.max_new_tokens} "
                f"tokens per pass). Lower it with {levers}a smaller resources.micro_batch_size, "
                "resources.activation_checkpointing, resources.logprob_chunk"
            )
    return estimate


def warm_worker_memory(config: WarpConfig, model_config: PretrainedConfig, sequence: int) -> RankMemory:
    """The estimate for a worker of a WARM fine-tune, pairs of up to `sequence` tokens a side."""
    w = config.warm
    return rank_bytes(
        model_config,
        *model_size(model_config, config.paths.trust_remote_code),
        ranks=w.workers_per_rm,
        zero_stage=w.zero_stage,
        bf16=w.precision == "bf16",
        rows=2 * w.batch_size // w.workers_per_rm,
        sequence=sequence,
        logprob_chunk=0,
        activation_checkpointing=False,
        causal_lm=False,
    )


def check_warm_fits(config: WarpConfig, model_config: PretrainedConfig, sequence: int) -> RankMemory:
    """The estimate; ConfigError naming its parts if a WARM worker on a GPU would need more than its share."""
    estimate = warm_worker_memory(config, model_config, sequence)
    w, gpu = config.warm, config.resources.gpu_memory_gb
    share = w.gpus_per_worker
    if share > 0 and estimate.total > share * gpu * GB:
        raise ConfigError(
            f"a worker of a WARM fine-tune would need about {estimate.total / GB:.1f} GB of GPU memory, over its "
            f"{share * gpu:.1f} GB (warm.gpus_per_trial / warm.workers_per_rm = {share:g} of a GPU of "
            f"resources.gpu_memory_gb = {gpu}) ({estimate}; {estimate.parameters / 1e9:.2f}B parameters, "
            f"{2 * w.batch_size // w.workers_per_rm} sequences of up to {sequence} tokens per pass). Lower it with "
            "more workers (warm.workers_per_rm and gpus_per_trial together, one GPU each) at warm.zero_stage 3, "
            "warm.precision bf16, or a smaller warm.batch_size"
        )
    return estimate
