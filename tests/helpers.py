"""Helpers shared by the test files (fixtures live in conftest.py): imported one way,
`from tests.helpers import ...`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import save_iteration


def tiny_gpt2(seed: int = 0, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=96, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def perturbed(model: GPT2LMHeadModel, seed: int, scale: float = 0.05) -> GPT2LMHeadModel:
    """A copy of `model` moved by a random task vector, as a fine-tune would."""
    generator = torch.Generator().manual_seed(seed)
    copy = GPT2LMHeadModel(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return copy


def save(out: Path, iteration: int, weights: dict, like: Path, extras=lambda folder: None) -> Path:
    """A WARP iteration checkpoint of `weights` (one shard, the tokenizer of `like`), as the coordinator
    writes one; tests/test_faults.py also calls it from a process it kills mid-write."""
    return save_iteration(
        out,
        iteration,
        [weights],
        1,
        like,
        {"iteration": iteration, "config": WarpConfig().model_dump(mode="json")},
        extras,
    )
