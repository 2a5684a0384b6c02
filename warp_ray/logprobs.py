"""Per-token log-probs of sampled completions: what the learner's loss and the evaluation's KL
both read from a causal LM's logits. Plain torch."""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log pi(tokens[:, t] | ...) from the logits that predict them (same length), in float32."""
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


def pack(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(prompt ids, completion ids) pairs as right-padded rows, with their attention mask and a
    mask of the completion tokens: the inputs of `token_logprobs` for a batch of samples."""
    length = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id)
    attention = torch.zeros(len(sequences), length, dtype=torch.long)
    completion = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, (p, c) in enumerate(sequences):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = 1
    return input_ids, attention, completion
