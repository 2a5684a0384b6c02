"""What the RL path feeds its parts, without Ray: the reward model's text, the prompt order,
the optimizer's settings and the warm-up. The learners' tests check the same on real engines."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from warp_ray.chat import reward_text
from warp_ray.checkpoint import context_length
from warp_ray.config import WarpConfig
from warp_ray.learner.learner import PromptOrder
from warp_ray.learner.rank import deepspeed_config, linear_warmup


def test_the_reward_model_reads_one_text_whatever_whitespace_the_completion_carries(tokenizer):
    prompt = "write about the garden in the rain :"
    stored = "the flower is lovely ."
    as_sampled = reward_text(tokenizer, prompt, " " + stored)
    assert as_sampled == reward_text(tokenizer, prompt, stored) == f"{prompt} {stored}"
    assert reward_text(tokenizer, prompt + " ", stored + "\n") == f"{prompt} {stored}"


def test_prompts_are_drawn_without_replacement_within_an_epoch():
    prompts = [f"prompt {i}" for i in range(10)]
    order = PromptOrder(prompts, random.Random(0))
    batches = [order.draw(4) for _ in range(5)]  # 20 draws: two epochs
    drawn = [p for batch in batches for p in batch]
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == sorted(prompts)  # each epoch is a permutation
    assert drawn[:10] != drawn[10:]  # in a new order
    assert all(len(set(batch)) == 4 for batch in batches[:2])  # no repeats inside an epoch's batches
    again = PromptOrder(prompts, random.Random(0))
    assert [again.draw(4) for _ in range(5)] == batches  # the run's seed fixes the order


def test_a_batch_repeats_a_prompt_only_where_it_straddles_two_epochs():
    order = PromptOrder(list(range(77)), random.Random(0))  # with replacement, a third of batches of 8 would repeat one
    straddling = [(8 * b) // 77 != (8 * b + 7) // 77 for b in range(2000)]
    repeats = [max(Counter(order.draw(8)).values()) > 1 for _ in range(2000)]
    assert all(s for s, r in zip(straddling, repeats) if r)


def test_the_optimizer_is_adam_with_the_configured_weight_decay():
    config = WarpConfig.from_dict({"warp": {"lr": 3e-4}})
    optimizer = deepspeed_config(config)["optimizer"]
    assert optimizer["params"]["weight_decay"] == 0.0  # torch's AdamW would decay by 0.01 if it were not named
    assert "scheduler" not in deepspeed_config(config)  # warm-up is linear_warmup, not WarmupLR
    decayed = WarpConfig.from_dict({"warp": {"weight_decay": 0.1}})
    assert deepspeed_config(decayed)["optimizer"]["params"]["weight_decay"] == 0.1


@pytest.mark.parametrize("warmup_steps", [0, 1, 5])
def test_warm_up_is_linear_from_the_first_step(warmup_steps):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear_warmup(warmup_steps)(optimizer)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [min(1.0, (s + 1) / max(1, warmup_steps)) for s in range(7)]
    assert rates == pytest.approx(expected)
    assert rates[0] > 0  # the first step moves the policy


def test_the_engines_context_is_the_models_when_the_tokenizer_sets_none(model_folders):
    """Tokenizers that set no limit say model_max_length = 1e30, which vLLM refuses as max_model_len:
    the learner gives its engines the model's positions (32 here), or the tokenizer's limit if lower."""
    tokenizer = AutoTokenizer.from_pretrained(model_folders["init"])
    assert tokenizer.model_max_length > 1e29  # the case: no limit set
    assert context_length(model_folders["init"], tokenizer, trust_remote_code=False) == 32
    tokenizer.model_max_length = 16
    assert context_length(model_folders["init"], tokenizer, trust_remote_code=False) == 16
