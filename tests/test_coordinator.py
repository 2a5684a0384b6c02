"""The coordinator for real: WARP's Algorithm 1 with M = 2 learners (DeepSpeed ranks, vLLM
engines) on a local Ray cluster, with faults injected by killing processes (SIGKILL): a
learner's rank mid-step, the reward server, a rollout engine, and the coordinator itself
mid-iteration, then resumed to the same result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from transformers import AutoModelForCausalLM

from warp_ray.checkpoint import load_model_weights
from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import last_complete, resume_from
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.coordinator.learners import LearnerGroup
from warp_ray.errors import ConfigError, TooFewLearners
from warp_ray.merge import liti, slerp

pytestmark = pytest.mark.slow


def warp_config(out, **warp) -> WarpConfig:
    return WarpConfig.from_dict(
        {
            "warp": {
                "M": 2,
                "I": 2,
                "T": 4,
                "batch_size": 4,
                "samples_per_prompt": 2,
                "max_new_tokens": 16,
                "lr": 3e-4,
                "beta": 0.02,
                "warmup_steps": 1,
                "mu": 0.1,
                "eta": 0.5,
                **warp,
            },
            "evaluation": {"every": 0, "prompts": 8, "samples_per_prompt": 2, "front_etas": [0.0, 0.5, 1.0]},
            "resources": {
                "precision": "fp32",
                "cpus_per_rank": 0.5,
                "cpus_per_rollout_worker": 0.5,  # 2 learners on 2 CPUs
                "rollout_in_process": True,
            },
            "paths": {"output_dir": str(out), "keep_policies": True},
        }
    )


def kill_when_training(log, actor_class: str) -> threading.Thread:
    """SIGKILL a process of this session's cluster running an `actor_class` actor as soon as `log`
    has a line (a learner is mid-run)."""

    def kill() -> None:
        while not (log.is_file() and log.read_text().strip()):
            time.sleep(0.1)
        os.kill(
            next(pid for pid, title in cluster_processes() if title.split(".")[0] == f"ray::{actor_class}"),
            signal.SIGKILL,
        )

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def cluster_processes() -> list[tuple[int, str]]:
    """(pid, title) of this session's Ray processes: "ray::LearnerRank.step" is a rank in a step."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            found.append((process.pid, (process.cmdline() or [""])[0]))
        except psutil.Error:  # ended since the listing
            pass
    return found


@ray.remote(num_cpus=0)
class Placed:
    """A learner's stand-in: placement is what is tested here, not training."""


def test_a_cluster_with_fewer_cpus_gets_fewer_learners_within_the_bounds(ray_cluster, tmp_path):
    config = warp_config(tmp_path, M=3)
    config.resources = config.resources.model_copy(
        update={"cpus_per_rank": 1, "cpus_per_rollout_worker": 1}
    )  # 2 CPUs a learner
    config.learners = config.learners.model_copy(update={"min": 1, "place_timeout_s": 5})
    group = LearnerGroup(config, lambda m, g: Placed.remote(), tmp_path)
    try:
        assert group.scale() == 1  # the 2-CPU cluster holds one learner of the 3 allowed
    finally:
        group.close()
    config.learners.min = 2
    group = LearnerGroup(config, lambda m, g: Placed.remote(), tmp_path)
    with pytest.raises(TooFewLearners, match=r"placed 1 learner\(s\) within 5 s, fewer than learners.min = 2"):
        group.scale()
    group.close()


def test_warp_survives_killed_processes_and_resumes_to_the_same_init(
    tiny_task, ray_cluster, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv(
        "HF_TOKEN", "hf_canary_secret_4242"
    )  # what a user's environment holds must not reach the run's files
    config, sft = warp_config(tmp_path), tiny_task / "sft"
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(
        config, sft, tiny_task / "prompts", ("gold", []), control=True
    )
    logs = tmp_path / "logs"
    killers = [
        kill_when_training(logs / "iteration_0" / "policy_1" / "metrics.jsonl", "LearnerRank"),  # mid-step
        kill_when_training(logs / "iteration_0" / "policy_0" / "metrics.jsonl", "RewardServer"),
        kill_when_training(logs / "iteration_1" / "policy_0" / "metrics.jsonl", "RolloutWorker"),
    ]
    try:
        assert ray.get(coordinator.run.remote()) == tmp_path / "iteration_1"
        assert not any(killer.is_alive() for killer in killers)
        check_run(config, tmp_path, sft)
        out, err = capfd.readouterr()
        assert "the reward server restarted after its process died; the calls in flight are retried" in out + err
        assert "died in iteration 0 (ActorDiedError); rerunning it from the iteration's init" in out + err
        assert not any(
            "hf_canary_secret_4242" in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
        )

        # The coordinator is killed mid-iteration 1: its learners die with it, iteration 0 stays whole, and
        # resuming redoes iteration 1 from iteration 0's checkpoint, same seeds, same result as without the kill.
        uninterrupted = load_model_weights(tmp_path / "iteration_1" / "model")
        manifest = (tmp_path / "iteration_0" / "manifest.json").read_text()
        shutil.rmtree(tmp_path / "iteration_1")
        shutil.rmtree(logs / "iteration_1")
        killer = kill_when_training(logs / "iteration_1" / "policy_0" / "metrics.jsonl", "Coordinator")
        with pytest.raises(RayActorError):
            ray.get(coordinator.run.remote(resume=True))
        assert not killer.is_alive()
    finally:
        ray.kill(coordinator)
    assert last_complete(tmp_path) == 0 and (tmp_path / "iteration_0" / "manifest.json").read_text() == manifest
    for (
        group_id,
        group,
    ) in ray.util.placement_group_table().items():  # they live as long as their job: end the dead coordinator's
        if group["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
    resumed = Coordinator(config, sft, tiny_task / "prompts", ("gold", []), control=True)
    try:
        resumed.run(resume=True)
    finally:
        resumed.close()
    for name, tensor in load_model_weights(tmp_path / "iteration_1" / "model").items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-6, msg=name)

    with pytest.raises(ConfigError, match="warp.beta was 0.02 in that run and is now 0.5"):
        resume_from(tmp_path, 1, warp_config(tmp_path, beta=0.5))


def check_run(config: WarpConfig, out, sft) -> None:
    """Every iteration whole despite the faults, its kept policies the ones merged into its next init."""
    for i in (0, 1):
        folder = out / f"iteration_{i}"
        assert {p.name for p in folder.iterdir()} == {
            "model",
            "policies",
            "manifest.json",
            "front.json",
            "front.png",
            "trajectories.json",
            "report.md",
        }
        assert AutoModelForCausalLM.from_pretrained(folder / "model") is not None  # a Hugging Face folder
        assert (
            len(json.loads((folder / "model" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
        )  # in 2 shards
        trajectories = json.loads((folder / "trajectories.json").read_text())
        assert [[h["step"] for h in t] for t in trajectories] == [
            [1, 2, 3, 4]
        ] * 2  # the rerun learner's history, whole
    assert (out / "report.md").read_text().count("## Iteration") == 2
    manifests = [json.loads((out / f"iteration_{i}" / "manifest.json").read_text()) for i in (0, 1)]
    rerun = [(r["iteration"], r["error"], r["rerun"]) for r in manifests[1]["restarts"]]
    assert rerun == [(0, "ActorDiedError", True), (1, "ActorDiedError", True)]  # the rank's death, then the engine's
    assert len(manifests[0]["restarts"]) == 1 and manifests[1]["rejected"] == []
    assert manifests[0]["seeds"][0] != manifests[0]["seeds"][1] and len(manifests[0]["final_metrics"]) == 2

    front = json.loads((out / "iteration_0" / "front.json").read_text())
    assert [(p["towards"], p["eta"]) for p in front] == [(t, e) for t in ("init", "sft") for e in (0.0, 0.5, 1.0)]
    at_sft = [p for p in front if p["eta"] == 0.0]  # iteration 0's init is the SFT: both bases give the SFT itself
    assert at_sft[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-3) and at_sft[0] == {**at_sft[1], "towards": "init"}
    assert front[2]["kl_to_sft"] > 0 and "control_reward" in front[2]

    sft_weights = load_model_weights(sft)
    first = load_model_weights(out / "iteration_0" / "model")
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(first[key], sft_weights[key])
    # The kept policies are the ones merged: SLERP and LITI of them, in one process, give each iteration's next init.
    for i, init in enumerate((sft_weights, first)):
        policies = [load_model_weights(out / f"iteration_{i}" / "policies" / f"policy_{m}") for m in (0, 1)]
        assert not torch.equal(policies[0][key], policies[1][key])
        merged, saved = (
            liti(init, slerp(init, policies), config.warp.eta),
            load_model_weights(out / f"iteration_{i}" / "model"),
        )
        for name in saved:
            torch.testing.assert_close(merged[name], saved[name], rtol=0, atol=1e-6, msg=name)
