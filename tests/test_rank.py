"""A learner rank as its Ray actor, without rollout engines: DeepSpeed's gradient accumulation over
micro-batches, and memory that does not grow from one RL run to the next (WARP starts a run per
iteration in the same process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from warp_ray.config import WarpConfig
from warp_ray.learner.policy_update import Batch
from warp_ray.learner.rank import RemoteLearnerRank

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
    rank = RemoteLearnerRank.remote(0, 1, config)
    # its learner's 2 CPUs (1 for the rank, 1 for the engine), both used in the update, the engine then idle
    assert ray.get(rank.__ray_call__.remote(lambda _: torch.get_num_threads())) == 2
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


def test_a_bf16_rank_keeps_its_anchor_in_float32_and_scores_with_it_in_bf16(mid_sized_sft, ray_cluster):
    """The EMA anchor's weights stay float32 (mu-sized steps survive) while its forward runs in the
    policy's bf16 (on a GPU, a float32 forward leaves bf16's tensor cores idle)."""
    config = WarpConfig.from_dict(
        {
            "warp": {"batch_size": 2, "samples_per_prompt": 2, "anchor": "ema"},
            "resources": {"precision": "bf16", "zero_stage": 1, "micro_batch_size": 2},
        }
    )

    def record_anchor_logits(r) -> None:
        r.scored = []
        r.anchor.lm_head.register_forward_hook(lambda module, args, out: r.scored.append(out.dtype))

    rank = RemoteLearnerRank.remote(0, 1, config)
    try:
        address, port = ray.get(rank.rendezvous.remote())
        ray.get(rank.setup.remote(address, port, str(mid_sized_sft)))
        ray.get(rank.start.remote(0))
        ray.get(rank.__ray_call__.remote(record_anchor_logits))
        stats = ray.get(rank.step.remote(share(config.rank_rows)))
        scored, stored = ray.get(
            rank.__ray_call__.remote(lambda r: (r.scored, {p.dtype for p in r.anchor.parameters()}))
        )
    finally:
        ray.kill(rank)
    assert scored == [torch.bfloat16, torch.bfloat16]  # one forward per micro-batch
    assert stored == {torch.float32} and stats["grad_norm"] > 0


def test_a_rank_run_with_another_ninja_first_on_its_path_loads_deepspeeds_op_as_built(tmp_path, ray_cluster):
    """A Ray worker whose PATH has another ninja first and not the environment's, as from a cluster started
    without activating the venv on a machine with a system ninja: the rank puts its environment's ninja first,
    which finds DeepSpeed's shared-memory op built and leaves it. Here the other ninja fails and leaves a
    mark, where a system ninja of another version (1.11 beside the venv's 1.13 on these machines) builds the op
    again, 25 s inside each rank; with no ninja at all DeepSpeed refuses to load the op: either fails this test."""
    from ninja import BIN_DIR

    own_ninja = Path(BIN_DIR) / "ninja"
    mark = tmp_path / "the other ninja ran"
    other = tmp_path / "other_tools"
    other.mkdir()
    (other / "ninja").write_text(f"#!/bin/sh\ntouch '{mark}'\nexit 1\n")
    (other / "ninja").chmod(0o755)
    environment_first = {**os.environ, "PATH": os.pathsep.join([BIN_DIR, os.environ["PATH"]]), "DS_ACCELERATOR": "cpu"}
    build = "from deepspeed.comm.torch import build_shm_op; print(build_shm_op().__file__)"
    built = subprocess.run([sys.executable, "-c", build], env=environment_first, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    op = Path(built.stdout.splitlines()[-1])  # the op's library, up to date for the environment's ninja
    stamp = op.stat().st_mtime_ns

    def without_own_ninja(folder: str) -> bool:
        found = shutil.which("ninja", path=folder)
        return bool(folder) and not (found and os.path.samefile(found, own_ninja))

    path = os.pathsep.join([str(other), *filter(without_own_ninja, os.environ["PATH"].split(os.pathsep))])
    config = WarpConfig.from_dict({"resources": {"precision": "fp32", "zero_stage": 2}})
    rank = RemoteLearnerRank.options(runtime_env={"env_vars": {"PATH": path}}).remote(0, 1, config)
    try:
        assert ray.get(rank.__ray_call__.remote(lambda _: shutil.which("ninja"))) == str(other / "ninja")
        address, port = ray.get(rank.rendezvous.remote())
        ray.get(rank.setup.remote(address, port, "unused"))
        loaded, ninja = ray.get(
            rank.__ray_call__.remote(
                lambda _: (__import__("deepspeed").comm.comm.cdb.shm_comm_op.__file__, shutil.which("ninja"))
            )
        )
    finally:
        ray.kill(rank)
    assert not mark.exists() and os.path.samefile(ninja, own_ninja)
    assert Path(loaded) == op and op.stat().st_mtime_ns == stamp


def test_zero3_ranks_build_a_padded_llama_sharded_and_decode_it_as_transformers_does(tmp_path, ray_cluster):
    """A Llama whose embedding has a padding row and is tied to the output (as Gemma's), built already sharded
    over 2 ranks, with activation checkpointing on: its gathered weights are the SFT's exactly, and
    greedy decoding from the training-mode policy matches transformers' in eval mode."""
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,  # as Gemma's: one parameter, saved once
        attention_dropout=0.5,  # a float the attention layers copy when built, applied in training mode
    )
    sft = LlamaForCausalLM(llama).eval()
    sft.save_pretrained(tmp_path / "sft")
    config = WarpConfig.from_dict(
        {
            "warp": {"batch_size": 2, "samples_per_prompt": 2, "anchor": "ema"},
            "resources": {
                "precision": "fp32",
                "zero_stage": 3,
                "ranks_per_learner": 2,
                "micro_batch_size": 2,
                "activation_checkpointing": True,
            },
        }
    )
    ranks = [RemoteLearnerRank.remote(k, 2, config) for k in range(2)]
    address, port = ray.get(ranks[0].rendezvous.remote())
    ray.get([rank.setup.remote(address, port, str(tmp_path / "sft")) for rank in ranks])
    ray.get([rank.start.remote(0) for rank in ranks])
    gathered = ray.get([rank.policy_state_dict.remote() for rank in ranks])
    assert gathered[1] is None  # one copy, rank 0's
    weights = dict(sft.named_parameters())
    assert sorted(gathered[0]) == sorted(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(gathered[0][name], tensor.detach(), rtol=0, atol=0)
    prompts = [[1, 5, 9, 14], [1, 7, 3]]
    expected = [
        sft.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6, pad_token_id=0)[0, len(p) :].tolist()
        for p in prompts
    ]
    assert ray.get([rank.greedy.remote(prompts, 6) for rank in ranks]) == [expected, expected]
    attention = ranks[0].__ray_call__.remote(lambda r: r.engine.module.model.layers[0].self_attn.attention_dropout)
    dropout = ray.get(attention)
    assert dropout == 0.0  # the policy trains in training mode: no dropout the engines do not sample with
    stats = ray.get([rank.step.remote(share(1 * 2)) for rank in ranks])  # each rank its 2 rows, one micro-batch
    assert all(s["grad_norm"] > 0 for s in stats)
    for rank in ranks:
        ray.kill(rank)
