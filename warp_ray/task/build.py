"""Build the built-in task on disk: tokenizer, SFT policy, prompts and preference data.

Everything is made on the fly from `world.py`, with no download (its time, which grows with
`task.pairs`, is in docs/results.md), and cached: a folder built with the same parameters is reused.

    <root>/sft/                      the SFT policy (an HF folder, tokenizer included)
    <root>/sft_checkpoints/step_<n>/ earlier checkpoints of the same SFT run (for Baklava)
    <root>/prompts/train.jsonl       {"prompt": ...}
    <root>/prompts/held_out.jsonl
    <root>/preferences/{train,validation,ood}.jsonl
                                     {"prompt", "chosen", "rejected", "flipped", "gold_chosen", "gold_rejected"}

Preference pairs are two samples for one prompt, ordered by a Bradley-Terry draw on the gold
reward, then flipped with probability `label_noise` (the WARM paper used 25%). Each sample comes
from the SFT, or, with `pair_checkpoints`, from any of its kept checkpoints, at one of
`pair_temperatures`: a mix of policies, as real preference data is. Validation pairs come from
the same mix; the OOD split from a shifted policy, the SFT sampled at `ood_temperature`. Completions are
sampled with the run's length limit (`warp.max_new_tokens`), the one RL and evaluation use, so
that the reward model is trained on completions cut where the policy's are.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from warp_ray.checkpoint import atomic_dir
from warp_ray.config import TaskParams, WarpConfig
from warp_ray.errors import ConfigError
from warp_ray.task import world

PAD, EOS = "<pad>", "<eos>"
MAX_LENGTH = 96  # the policy's context, or more where the length limit needs it


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        model_max_length=MAX_LENGTH,
        padding_side="left",
    )


def new_policy(architecture: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A small policy whose context is the tokenizer's `model_max_length`."""
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    context = tokenizer.model_max_length
    if architecture == "llama":
        config = LlamaConfig(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            tie_word_embeddings=True,
            **ids,
        )
        return LlamaForCausalLM(config)
    return GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=context, **ids))


def sft_train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    steps: int,
    seed: int,
    batch_size: int = 64,
    keep_at: Sequence[int] = (),
) -> tuple[list[float], dict[int, dict]]:
    """Next-token training on prompt + completion + eos; returns the loss curve and copies of
    the weights after each step in `keep_at` (the checkpoints along the run)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    model.train()
    losses, kept = [], {}
    for step in range(1, steps + 1):
        batch = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=generator)]
        encoded = tokenizer([t + EOS for t in batch], return_tensors="pt", padding=True, padding_side="right")
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        loss = model(**encoded, labels=labels, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step in keep_at:
            kept[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    return losses, kept


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    temperature: float,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    torch.manual_seed(seed)
    completions = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(
            **encoded,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += tokenizer.batch_decode(out[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)
    return [c.strip() for c in completions]


def preference_pairs(
    model,
    tokenizer,
    policies: Sequence[tuple[dict, float]],
    prompts: list[str],
    count: int,
    label_noise: float,
    seed: int,
    max_new_tokens: int,
) -> list[dict]:
    """`count` pairs of two completions of one prompt, each completion sampled from a policy drawn
    from `policies` ((weights of `model`, temperature): several make the mix of models and settings
    that real preference data compares), ordered by a Bradley-Terry draw on the gold reward, then
    flipped with probability `label_noise`. `model` keeps its own weights."""
    rng = random.Random(seed)
    chosen_prompts = [rng.choice(prompts) for _ in range(count)]
    sources = [rng.randrange(len(policies)) for _ in range(2 * count)]  # completion 2i and 2i + 1 of pair i
    seeds = [rng.randrange(2**31) for _ in policies]
    own = {k: v.clone() for k, v in model.state_dict().items()}
    completions = [""] * (2 * count)
    for k, (weights, temperature) in enumerate(policies):
        slots = [i for i, source in enumerate(sources) if source == k]
        model.load_state_dict(weights)
        texts = sample(model, tokenizer, [chosen_prompts[i // 2] for i in slots], temperature, seeds[k], max_new_tokens)
        for i, text in zip(slots, texts):
            completions[i] = text
    model.load_state_dict(own)
    pairs = []
    for prompt, a, b in zip(chosen_prompts, completions[0::2], completions[1::2]):
        gold_a, gold_b = world.gold_reward(prompt, a), world.gold_reward(prompt, b)
        if rng.random() >= 1.0 / (1.0 + math.exp(gold_b - gold_a)):  # Bradley-Terry: P(a preferred)
            a, b, gold_a, gold_b = b, a, gold_b, gold_a
        flipped = rng.random() < label_noise
        if flipped:
            a, b, gold_a, gold_b = b, a, gold_b, gold_a
        pairs.append(
            {
                "prompt": prompt,
                "chosen": a,
                "rejected": b,
                "flipped": flipped,
                "gold_chosen": gold_a,
                "gold_rejected": gold_b,
            }
        )
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_task(params: TaskParams, root: Path, max_new_tokens: int) -> Path:
    """Build the task under `root` (or reuse it if built with the same params and length limit,
    `warp.max_new_tokens`); returns root."""
    root = Path(root)
    manifest = root / "task.json"
    built_with = {**params.model_dump(), "max_new_tokens": max_new_tokens, "world": world.FINGERPRINT}
    if manifest.is_file() and json.loads(manifest.read_text()).get("params") == built_with:
        return root
    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    prompts = [world.prompt_for(topic, when) for topic in world.TOPICS for when in world.WHEN]
    rng.shuffle(prompts)
    held_out_count = max(1, round(params.held_out_fraction * len(prompts)))
    held_out, train_prompts = prompts[:held_out_count], prompts[held_out_count:]
    corpus = []
    for _ in range(params.corpus_size):
        prompt = rng.choice(train_prompts)
        corpus.append(f"{prompt} {world.completion(world.topic_of(prompt), rng)}")

    tokenizer = train_tokenizer(corpus)
    # The context holds the longest prompt and the length limit, with room for the few more tokens a
    # sampled completion may take once re-tokenized, as the reward model reads it.
    longest_prompt = max(len(ids) for ids in tokenizer(prompts).input_ids)
    tokenizer.model_max_length = max(MAX_LENGTH, longest_prompt + max_new_tokens + max_new_tokens // 4)
    model = new_policy(params.architecture, tokenizer)
    keep_at = [round(params.sft_steps * (k + 1) / (params.sft_checkpoints + 1)) for k in range(params.sft_checkpoints)]
    losses, checkpoints = sft_train(model, tokenizer, corpus, params.sft_steps, params.seed, keep_at=keep_at)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    writers = [final, *(checkpoints.values() if params.pair_checkpoints else ())]
    mix = [(weights, temperature) for weights in writers for temperature in params.pair_temperatures]
    splits = {
        "train": preference_pairs(
            model, tokenizer, mix, train_prompts, params.pairs, params.label_noise, params.seed + 10, max_new_tokens
        ),
        "validation": preference_pairs(
            model, tokenizer, mix, held_out, params.validation_pairs, 0.0, params.seed + 20, max_new_tokens
        ),
        "ood": preference_pairs(
            model,
            tokenizer,
            [(final, params.ood_temperature)],
            held_out,
            params.ood_pairs,
            0.0,
            params.seed + 30,
            max_new_tokens,
        ),
    }
    with atomic_dir(root, overwrite=True) as tmp:
        for step, weights in checkpoints.items():
            model.load_state_dict(weights)
            model.save_pretrained(tmp / "sft_checkpoints" / f"step_{step}")
            tokenizer.save_pretrained(tmp / "sft_checkpoints" / f"step_{step}")
        model.load_state_dict(final)
        model.save_pretrained(tmp / "sft")
        tokenizer.save_pretrained(tmp / "sft")
        write_jsonl(tmp / "prompts" / "train.jsonl", [{"prompt": p} for p in train_prompts])
        write_jsonl(tmp / "prompts" / "held_out.jsonl", [{"prompt": p} for p in held_out])
        for name, rows in splits.items():
            write_jsonl(tmp / "preferences" / f"{name}.jsonl", rows)
        (tmp / "task.json").write_text(
            json.dumps(
                {
                    "params": built_with,
                    "sft_loss": {"first": losses[0], "last": sum(losses[-20:]) / 20},
                    "parameters": sum(p.numel() for p in model.parameters()),
                },
                indent=2,
            )
        )
    return root


def task_inputs(
    config: WarpConfig, preferences: bool = True, prompts: bool = True
) -> tuple[Path, Optional[Path], Optional[Path], list[Path]]:
    """(SFT folder, prompts folder, preferences folder, earlier SFT checkpoints): the user's where
    the config sets them, the built-in task's (built or reused under <output_dir>/task) otherwise.
    preferences (prompts) False: the run trains no reward model (samples no prompt), so nothing is
    needed for them. With the user's own SFT, nothing is built: the built-in task's prompts and
    preference pairs belong to its own SFT, so each the run needs must be given."""
    paths = config.paths
    if paths.sft_model is not None:
        needed = {
            "paths.prompts (RL samples them)": prompts and paths.prompts is None,
            "paths.preferences (reward models are trained on them)": preferences and paths.preferences is None,
        }
        if any(needed.values()):
            raise ConfigError(
                "paths.sft_model is your own model, so the built-in task's data does not fit it: set "
                + " and ".join(k for k, v in needed.items() if v)
            )
        return paths.sft_model, paths.prompts, paths.preferences, list(paths.sft_checkpoints)
    root = build_task(config.task, paths.output_dir / "task", config.warp.max_new_tokens)
    return (
        root / "sft",
        paths.prompts or root / "prompts",
        paths.preferences or root / "preferences",
        sorted((root / "sft_checkpoints").iterdir()),
    )
