"""The coordinator for real: WARP's Algorithm 1 with M = 2 learners (DeepSpeed ranks, vLLM
engines) on a local Ray cluster, a learner killed mid-iteration, and a resume."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from warp_ray.checkpoint import load_model_weights
from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import last_complete, resume_from
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.coordinator.learners import LearnerGroup, RemoteLearner
from warp_ray.data import read_prompts
from warp_ray.errors import ConfigError
from warp_ray.merge import liti, slerp
from warp_ray.reward.server import RewardServer

pytestmark = pytest.mark.slow


def warp_config(out, **warp) -> WarpConfig:
    return WarpConfig.from_dict({
        "warp": {"M": 2, "I": 2, "T": 4, "batch_size": 4, "samples_per_prompt": 2, "max_new_tokens": 16, "lr": 3e-4,
                 "beta": 0.02, "warmup_steps": 1, "mu": 0.1, "eta": 0.5, **warp},
        "evaluation": {"every": 2, "prompts": 8, "samples_per_prompt": 2, "front_etas": [0.0, 0.5, 1.0]},
        "resources": {"precision": "fp32", "cpus_per_rank": 0.5, "cpus_per_rollout_worker": 0.5},  # 2 learners on 2 CPUs
        "paths": {"output_dir": str(out), "keep_policies": True}})


def kill_when_training(log, name: str) -> threading.Thread:
    """Kill the named learner's process as soon as it has logged a step."""
    def kill() -> None:
        while not (log.is_file() and log.read_text().strip()):
            time.sleep(0.1)
        ray.kill(ray.get_actor(name))

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_cluster_with_fewer_cpus_gets_fewer_learners_within_the_bounds(tiny_task, ray_cluster, tmp_path):
    config = warp_config(tmp_path, M=3)
    config.resources = config.resources.model_copy(update={"cpus_per_rank": 1, "cpus_per_rollout_worker": 1})  # 2 CPUs a learner
    config.learners = config.learners.model_copy(update={"min": 1, "place_timeout_s": 5})
    prompts = read_prompts(tiny_task / "prompts" / "train.jsonl")

    def make_learner(m, group):
        return RemoteLearner.remote(config, str(tiny_task / "sft"), prompts, RewardServer.remote("gold"), seed=m, placement_group=group)

    group = LearnerGroup(config, make_learner, tmp_path)
    try:
        assert group.scale() == 1  # the 2-CPU cluster holds one learner of the 3 allowed
    finally:
        group.close()
    config.learners.min = 2
    group = LearnerGroup(config, make_learner, tmp_path)
    with pytest.raises(RuntimeError, match=r"placed 1 learner\(s\) .* fewer than learners.min = 2"):
        group.scale()
    group.close()


def test_warp_survives_a_killed_learner_and_resumes_to_the_same_init(tiny_task, ray_cluster, tmp_path):
    config = warp_config(tmp_path)
    sft = tiny_task / "sft"
    coordinator = Coordinator(config, sft, tiny_task / "prompts", ("gold", []), control=True)
    try:
        run_and_resume(coordinator, tmp_path, sft)
    finally:
        coordinator.close()


def run_and_resume(coordinator: Coordinator, tmp_path, sft) -> None:
    killer = kill_when_training(tmp_path / "logs" / "iteration_0" / "policy_1" / "metrics.jsonl", "warp-learner-1")
    assert coordinator.run() == tmp_path / "iteration_1"
    assert not killer.is_alive()

    for i in (0, 1):
        folder = tmp_path / f"iteration_{i}"
        assert {p.name for p in folder.iterdir()} == {"model", "policies", "manifest.json", "front.json", "front.png", "trajectories.json",
                                                      "report.md"}
        assert AutoModelForCausalLM.from_pretrained(folder / "model") is not None  # a Hugging Face folder
        assert len(json.loads((folder / "model" / "model.safetensors.index.json").read_text())["weight_map"]) > 0  # in 2 shards
    assert (tmp_path / "report.md").read_text().count("## Iteration") == 2
    manifest = json.loads((tmp_path / "iteration_0" / "manifest.json").read_text())
    assert manifest["restarts"] == [{"iteration": 0, "policy": 1, "error": manifest["restarts"][0]["error"], "rerun": True}]
    assert manifest["seeds"][0] != manifest["seeds"][1] and len(manifest["final_metrics"]) == 2
    trajectories = json.loads((tmp_path / "iteration_0" / "trajectories.json").read_text())
    assert [[h["step"] for h in t] for t in trajectories] == [[1, 2, 3, 4]] * 2  # the rerun learner's history, whole

    front = json.loads((tmp_path / "iteration_0" / "front.json").read_text())
    assert [(p["towards"], p["eta"]) for p in front] == [(t, e) for t in ("init", "sft") for e in (0.0, 0.5, 1.0)]
    at_sft = [p for p in front if p["eta"] == 0.0]  # iteration 0's init is the SFT: both bases give the SFT itself
    assert at_sft[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-3) and at_sft[0] == {**at_sft[1], "towards": "init"}
    assert front[2]["kl_to_sft"] > 0 and "control_reward" in front[2]

    sft_weights = load_model_weights(sft)
    first = load_model_weights(tmp_path / "iteration_0" / "model")
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(first[key], sft_weights[key])
    # The kept policies are the ones merged: SLERP and LITI of them, in one process, give each iteration's next init.
    eta = coordinator.config.warp.eta
    for i, init in enumerate((sft_weights, first)):
        policies = [load_model_weights(tmp_path / f"iteration_{i}" / "policies" / f"policy_{m}") for m in (0, 1)]
        assert not torch.equal(policies[0][key], policies[1][key])
        merged, saved = liti(init, slerp(init, policies), eta), load_model_weights(tmp_path / f"iteration_{i}" / "model")
        for name in saved:
            torch.testing.assert_close(merged[name], saved[name], rtol=0, atol=1e-6, msg=name)

    # The run "dies" during iteration 1: resuming redoes it from iteration 0's checkpoint, same seeds, same result.
    uninterrupted = load_model_weights(tmp_path / "iteration_1" / "model")
    shutil.rmtree(tmp_path / "iteration_1")
    assert last_complete(tmp_path) == 0
    coordinator.run(resume=True)
    resumed = load_model_weights(tmp_path / "iteration_1" / "model")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)

    with pytest.raises(ConfigError, match="warp.beta was 0.02 in that run and is now 0.5"):
        resume_from(tmp_path, 1, warp_config(tmp_path, beta=0.5))
