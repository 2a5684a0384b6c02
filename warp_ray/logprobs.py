"""Per-token log-probs of sampled completions: what the learner's loss and the evaluation's KL
both read from a causal LM's logits. Plain torch."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk: int = 0) -> Tensor:
    """log pi_T(tokens[:, t] | ...) from the logits that predict them (same length), in float32, at
    temperature T. `chunk` > 0: that many positions at a time, each chunk's float32 log-softmax
    recomputed in the backward pass rather than kept, so that the float32 logits of the whole batch
    never exist (a 256k vocabulary makes them the largest tensor of a step)."""
    if chunk <= 0 or chunk >= logits.shape[1]:
        return _chunk_logprobs(logits, tokens, temperature)
    pieces = []
    for start in range(0, logits.shape[1], chunk):
        part = (logits[:, start : start + chunk], tokens[:, start : start + chunk], temperature)
        pieces.append(
            checkpoint(_chunk_logprobs, *part, use_reentrant=False) if logits.requires_grad else _chunk_logprobs(*part)
        )
    return torch.cat(pieces, dim=1)


def _chunk_logprobs(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    return (logits.float() / temperature).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0, chunk: int = 0) -> Tensor:
    """H(pi_T(. | ...)) at every position, in float32, `chunk` positions at a time (0: all at once)."""
    step = chunk if chunk > 0 else logits.shape[1]
    pieces = []
    for start in range(0, logits.shape[1], step):
        log_probs = (logits[:, start : start + step].float() / temperature).log_softmax(-1)
        pieces.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(pieces, dim=1)


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
