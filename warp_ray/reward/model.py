"""Reward models: a sequence classifier with one output on the policy's backbone, trained
with the Bradley-Terry loss -log sigmoid(r(x, y_chosen) - r(x, y_rejected)). Each reads (x, y) as
`warp_ray.chat.reward_text` renders it with the model's own tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from warp_ray.chat import Messages, Prompt, reward_text, with_padding
from warp_ray.checkpoint import check_model_folder, context_length

DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout")
"""Dropout settings of the GPT-2 and Llama families (Gemma's and Qwen's are Llama's); a config takes
those it has."""


def set_dropout(config: PretrainedConfig, p: float) -> PretrainedConfig:
    """`config` with each of its DROPOUT_KEYS set to p, before a model is built from it: layers copy
    these settings when they are built (an attention layer keeps attention_dropout as a float)."""
    for key in DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, p)
    return config


def load_reward_model(
    folder: str | Path,
    dropout: float | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An RM from an RM folder, or a fresh one-output head on a causal-LM folder (the policy's backbone)."""
    folder = check_model_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # The model's positions where the tokenizer sets no limit (1e30): what truncation and the
    # reward server's length check hold pairs to.
    tokenizer.model_max_length = context_length(folder, with_padding(tokenizer), trust_remote_code)
    config = AutoConfig.from_pretrained(
        folder, num_labels=1, pad_token_id=tokenizer.pad_token_id, trust_remote_code=trust_remote_code
    )
    if dropout is not None:
        set_dropout(config, dropout)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, config=config, trust_remote_code=trust_remote_code, dtype=dtype
    )
    return model.eval(), tokenizer


def reward_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], completions: Sequence[str | Messages]
) -> list[str]:
    return [reward_text(tokenizer, p, c) for p, c in zip(prompts, completions)]


def by_length(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    completions: Sequence[str | Messages],
    batch_size: int,
    forward: Callable[[BatchEncoding], torch.Tensor],
) -> torch.Tensor:
    """forward's rows for each (prompt, completion), in their order, computed on batches of texts of
    like token length so that a batch pads little: on the built-in task's pairs that halves the time."""
    if not prompts:
        raise ValueError("by_length needs at least one (prompt, completion)")
    ids = tokenizer(reward_texts(tokenizer, prompts, completions), truncation=True)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = None
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        values = forward(
            tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt", padding_side="right")
        )
        if out is None:  # allocated once its shape, dtype and device are known: no second copy of every row
            out = values.new_empty((len(ids), *values.shape[1:]))
        out[rows] = values
    return out


@torch.no_grad()
def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    completions: Sequence[str | Messages],
    batch_size: int = 64,
) -> torch.Tensor:
    """r(x, y) for each (prompt, completion), in their order: one forward pass per batch, no gradient."""
    if not prompts:
        return torch.empty(0)
    return by_length(
        tokenizer,
        prompts,
        completions,
        batch_size,
        lambda batch: model(**batch.to(model.device), use_cache=False).logits[:, 0].float().cpu(),
    )


def bradley_terry_loss(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict]
) -> torch.Tensor:
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    encoded = tokenizer(
        reward_texts(tokenizer, prompts, chosen) + reward_texts(tokenizer, prompts, rejected),
        return_tensors="pt",
        padding=True,
        truncation=True,
        padding_side="right",
    ).to(model.device)
    # float: in bf16, reward differences would be rounded to 2^-8 of them
    rewards = model(**encoded, use_cache=False).logits[:, 0].float()
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def pooled_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    completions: Sequence[str | Messages],
    batch_size: int = 64,
) -> torch.Tensor:
    """The backbone's final hidden state at each text's last token: what the score head reads."""

    def last_hidden(batch: BatchEncoding) -> torch.Tensor:
        batch = batch.to(model.device)
        hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1]
        # The last token that is not padding, as the score head's model reads it: with EOS as the pad
        # token (a tokenizer that has none), a reply's closing EOS is not it.
        positions = torch.arange(batch.input_ids.shape[1], device=hidden.device)
        last = ((batch.input_ids != tokenizer.pad_token_id) * positions).argmax(-1)
        return hidden[torch.arange(len(hidden), device=hidden.device), last].float()

    return by_length(tokenizer, prompts, completions, batch_size, last_hidden)


def linear_probe(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict], steps: int, lr: float
) -> list[float]:
    """Train the score head alone on the frozen backbone's features (WARM's linear probing).

    The backbone is frozen, so its features are computed once and the head, a linear map,
    is fitted on them with full-batch Adam: seconds instead of a pass per step.
    """
    prompts = [p["prompt"] for p in pairs]
    chosen = pooled_features(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    rejected = pooled_features(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    head = model.score
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = -F.logsigmoid(head(chosen)[:, 0] - head(rejected)[:, 0]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, flipped: Sequence[bool] | None = None) -> float:
    """Fraction of pairs ranked as labelled; with `flipped`, as labelled before the flips (the true labels)."""
    right = chosen > rejected
    if flipped is not None:
        right = right ^ torch.tensor(list(flipped), dtype=torch.bool)
    return right.float().mean().item()


class RewardModels:
    """Reward model folders loaded to score pairs: one (a single RM, WARM's merge) or several (their
    ENS, the mean of their scores), on `device` (bf16 on a GPU: a 7B RM in float32 fills a 40 GB GPU)."""

    def __init__(self, folders: Sequence[str | Path], trust_remote_code: bool, device: torch.device):
        if not folders:
            raise ValueError("RewardModels needs at least one reward model folder")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        loaded = (load_reward_model(folder, trust_remote_code=trust_remote_code, dtype=dtype) for folder in folders)
        self.models = [(model.to(device), tokenizer) for model, tokenizer in loaded]
        self.max_length = min(tokenizer.model_max_length for _, tokenizer in self.models)
        # A tokenizer of its own for `check_lengths`: the server checks requests in its event loop
        # while a batch is scored in a worker thread, and a tokenizer is not safe to share between threads.
        self.length_tokenizer = AutoTokenizer.from_pretrained(folders[0], trust_remote_code=trust_remote_code)

    def check_lengths(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> None:
        texts = reward_texts(self.length_tokenizer, prompts, completions)
        lengths = [len(ids) for ids in self.length_tokenizer(texts).input_ids]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            i, n = too_long[0]
            raise ValueError(
                f"pair {i} is {n} tokens long, over the reward model's limit of {self.max_length} "
                f"({len(too_long)} pair(s) too long)"
            )

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int) -> list[float]:
        scores = [
            score(model, tokenizer, prompts, completions, batch_size=batch_size) for model, tokenizer in self.models
        ]
        return torch.stack(scores).mean(0).tolist()
