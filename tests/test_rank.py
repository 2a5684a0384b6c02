"""A learner rank as its Ray actor, without rollout engines: DeepSpeed's gradient accumulation over
micro-batches, and memory that does not grow from one RL run to the next (WARP starts a run per
iteration in the same process)."""

from __future__ import annotations

import os

import psutil
import pytest
import ray
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from warp_ray.config import WarpConfig
from warp_ray.learner.policy_update import Batch
from warp_ray.learner.rank import LearnerRank

pytestmark = pytest.mark.slow
MB = 2**20


@pytest.fixture(scope="module")
def mid_sized_sft(tmp_path_factory):
    """A 19M-parameter GPT-2 (75 MB in float32): a run's weights, gradients, Adam state and anchor
    are about 300 MB, well above the noise of a process's resident memory."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=512, n_layer=6, n_head=8, bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("mid") / "sft"
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def share(rows: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    completion = torch.zeros(rows, 16, dtype=torch.long)
    completion[:, 4:] = 1
    return Batch(
        input_ids=torch.randint(1, 128, (rows, 16), generator=g),
        attention_mask=torch.ones(rows, 16, dtype=torch.long),
        completion_mask=completion,
        rewards=torch.randn(rows, generator=g),
        sampled_logprobs=torch.zeros(rows, 16),
    )


def test_runs_free_their_memory_and_micro_batches_accumulate_into_one_optimizer_step(mid_sized_sft, ray_cluster):
    config = WarpConfig.from_dict(
        {
            "warp": {"batch_size": 2, "samples_per_prompt": 2, "anchor": "ema", "lr": 1e-4},
            "resources": {"precision": "fp32", "zero_stage": 2, "micro_batch_size": 2},
        }
    )
    rank = LearnerRank.remote(0, 1, config)
    address, port = ray.get(rank.rendezvous.remote())
    ray.get(rank.setup.remote(address, port, str(mid_sized_sft)))
    rss = []
    for run in range(4):
        ray.get(rank.start.remote(run))
        stats = ray.get(rank.step.remote(share(config.rank_rows)))
        assert stats["grad_norm"] > 0
        # 4 rows in 2 micro-batches: DeepSpeed steps the optimizer (and the scheduler) once
        steps = ray.get(rank.__ray_call__.remote(lambda r: (r.engine.global_steps, r.engine.micro_steps)))
        assert steps == (1, 2)
        rss.append(ray.get(rank.__ray_call__.remote(lambda _: psutil.Process(os.getpid()).memory_info().rss)) / MB)
    ray.kill(rank)
    # A run's engine and anchor still held while the next is built would add about 300 MB (measured: 290
    # MB from run 1 to 2, then level); freed first, later runs stay within 70 MB of the first.
    assert max(rss[1:]) - rss[0] < 150, f"resident memory after runs 1-4: {[round(r) for r in rss]} MB"
