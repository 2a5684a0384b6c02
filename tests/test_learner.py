"""A learner for real: DeepSpeed ranks (gloo on the CPU) fed by a vLLM rollout worker, scored by
a reward server, on a local Ray cluster."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import ray
import torch
from safetensors.torch import load_file

from warp_ray.config import WarpConfig
from warp_ray.data import read_prompts
from warp_ray.learner.learner import Learner
from warp_ray.reward.server import RewardServer

pytestmark = pytest.mark.slow


def tiny_config(**warp) -> WarpConfig:
    settings = {"batch_size": 8, "samples_per_prompt": 4, "max_new_tokens": 24, "lr": 3e-4, "beta": 0.02,
                "warmup_steps": 5, **warp}
    return WarpConfig.from_dict({"warp": settings, "resources": {"precision": "fp32", "zero_stage": 2}})


def test_two_rank_learner_raises_the_reward_and_keeps_ranks_in_sync(tiny_task, ray_cluster, tmp_path):
    config = tiny_config(anchor="ema", mu=0.1)
    config.resources.ranks_per_learner = 2
    learner = Learner(config, tiny_task / "sft", read_prompts(tiny_task / "prompts" / "train.jsonl"),
                      RewardServer.remote("gold"), seed=0)
    history = learner.run(30, log=tmp_path / "metrics.jsonl")
    rewards = [m["reward"] for m in history]
    assert statistics.mean(rewards[-8:]) > statistics.mean(rewards[:8]) + 0.5
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 31)) and logged[-1]["reward"] == rewards[-1]
    for m in history:
        assert 0 < m["entropy"] < math.log(32000) and m["grad_norm"] > 0 and m["tokens_per_s"] > 0
        assert 0 < m["sync_seconds"] < m["seconds"]
    assert history[0]["lr"] < history[-1]["lr"] == pytest.approx(3e-4)  # linear warm-up over 5 steps

    first, second = ray.get([rank.policy_state_dict.remote() for rank in learner.ranks])
    for key in first:
        assert torch.equal(first[key], second[key]), key  # DeepSpeed kept the two ranks identical
    sft = load_file(tiny_task / "sft" / "model.safetensors")
    anchor = ray.get(learner.ranks[0].anchor_state_dict.remote())
    key = "transformer.h.0.attn.c_attn.weight"
    moved, drift = (anchor[key] - sft[key]).norm(), (first[key] - sft[key]).norm()
    assert 0 < moved < drift  # the EMA anchor follows the policy, from behind


def test_sft_anchor_stays_put(tiny_task, ray_cluster):
    learner = Learner(tiny_config(anchor="sft"), tiny_task / "sft", read_prompts(tiny_task / "prompts" / "train.jsonl"),
                      RewardServer.remote("gold"), seed=1)
    stats = [learner.step() for _ in range(3)]
    sft = load_file(tiny_task / "sft" / "model.safetensors")
    anchor = ray.get(learner.ranks[0].anchor_state_dict.remote())
    policy = learner.policy_state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(anchor[key], sft[key]) and not torch.equal(policy[key], sft[key])
    assert stats[0]["kl_to_anchor"] == pytest.approx(0.0, abs=1e-4)  # the first batch comes from the anchor itself

    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[:4]
    learner.check_engine_agrees(prompts)  # after syncs, the engine still samples from the policy
    ray.get(learner.rollout.update_weights.remote(sft))  # an engine left behind...
    with pytest.raises(RuntimeError, match="disagree on greedy completions"):
        learner.check_engine_agrees(prompts)  # ...is caught
