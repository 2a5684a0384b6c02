"""The coordinator for real: WARP's Algorithm 1 with M = 2 learners (DeepSpeed ranks, vLLM
engines) on a local Ray cluster, with faults injected by killing processes (SIGKILL): a
learner's rank mid-run, the reward server, a rollout engine, and the coordinator itself
mid-iteration, then resumed to the same result.

One faulted run serves the module (`faulted_run`); `killed_and_resumed` builds on it, killing the
coordinator and resuming in the same folder. The tests read what the runs recorded (the
iterations' files, their manifests, Ray's actor table), each fact kept by the fixture that saw it,
so they may run in any order.

The processes to kill are found through the actors, in Ray's actor table: which actor started
which, and its process id. The table is read from Ray's GCS (`ray._private.state`, Ray is pinned):
the public `ray.util.state` asks the dashboard, which the test cluster does not start (see
warp_ray.runtime.init_ray). Asking the actors themselves (a `pid()` method) would not reach them:
the ranks and engines are known only to their learner, which is busy in its run and answers calls
one at a time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import ray
import torch
from ray._private.state import actors as actor_table
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from transformers import AutoModelForCausalLM

from tests.helpers import actor_table_rows
from warp_ray.checkpoint import load_model_weights
from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import last_complete, resume_from
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.errors import ConfigError
from warp_ray.merge import liti, slerp
from warp_ray.reward.server import RewardSource
from warp_ray.task import world

pytestmark = pytest.mark.slow

SECRET = "hf_canary_secret_4242"  # in HF_TOKEN during the runs: what a user's environment holds must stay out
COORDINATOR = "warp-test-coordinator"  # the coordinator actor's name, by which its killer finds it
RUN_TIMEOUT_S = 1800  # a run (minutes on 2 busy CPUs) that takes longer is stuck
VICTIM_WITHIN_S = 120  # from the log line that sets a killer off to its victim found in Ray's actor table
ITERATION_FILES = {"model", "policies", "manifest.json", "front.json", "front.png", "trajectories.json", "report.md"}
KEY = "transformer.h.0.attn.c_attn.weight"


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


def live_actor(cls: str, *, owner: Optional[str] = None, name: Optional[str] = None) -> Optional[dict]:
    """The row of Ray's actor table of a live `cls` actor named `name`, or started by the live actor
    named `owner` (a learner's ranks and engines by the learner, "warp-learner-<m>"); None if none."""
    alive = actor_table(actor_state_name="ALIVE").values()
    owners = [a["Address"] for a in alive if a["Name"] == owner]
    return next(
        (a for a in alive if a["ActorClassName"] == cls and (a["Name"] == name or a["OwnerAddress"] in owners)),
        None,
    )


class Killer(threading.Thread):
    """SIGKILLs the process of the actor `find` picks in Ray's actor table as soon as `log` has a
    line (its learner is mid-run). `result()`, once the run aimed at has ended, gives the victim's row
    of the table, or fails saying why there was none: `log` had no line before the run ended (or
    within RUN_TIMEOUT_S), or no victim was found within VICTIM_WITHIN_S of it."""

    def __init__(self, log: Path, victim: str, find: Callable[[], Optional[dict]]):
        super().__init__(daemon=True)
        self.log, self.victim, self.find = log, victim, find
        self.ended = threading.Event()
        self.killed: Optional[dict] = None
        self.failure = ""
        self.start()

    def run(self) -> None:
        try:
            self.hunt()
        except Exception as e:  # a failed read of the actor table, say: said by result(), not lost with the thread
            self.failure = f"the killer of {self.victim} failed: {e!r}"

    def hunt(self) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (self.log.is_file() and self.log.read_text().strip()):
            if self.ended.wait(0.1) or time.monotonic() > deadline:
                self.failure = f"{self.log} had no line before the run ended: no {self.victim} was killed"
                return
        deadline = time.monotonic() + VICTIM_WITHIN_S
        while (actor := self.find()) is None:
            if time.monotonic() > deadline:
                self.failure = f"no live {self.victim} in Ray's actor table within {VICTIM_WITHIN_S} s of {self.log}"
                return
            time.sleep(0.1)
        os.kill(actor["Pid"], signal.SIGKILL)
        self.killed = actor

    def stop(self) -> None:
        """The run aimed at has ended: a killer still waiting for its log line gives up."""
        self.ended.set()
        self.join()

    def result(self) -> dict:
        self.stop()
        if self.killed is None:
            pytest.fail(self.failure)
        return self.killed


def metrics(out: Path, iteration: int, m: int) -> Path:
    """Where learner m writes its metrics in an iteration, a line per step."""
    return out / "logs" / f"iteration_{iteration}" / f"policy_{m}" / "metrics.jsonl"


def kill_when_training(log: Path, cls: str, **where: str) -> Killer:
    """A Killer of the live `cls` actor `where` says (see live_actor) once `log` has a line."""
    return Killer(log, f"{cls} ({', '.join(f'{k} {v}' for k, v in where.items())})", lambda: live_actor(cls, **where))


def free_placement_groups() -> None:
    """Remove the placement groups left: they live as long as their job (this test session), even
    after the coordinator that made them is gone."""
    for group_id, group in ray.util.placement_group_table().items():
        if group["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))


def worker_stderr(pid: int) -> str:
    """What Ray worker process `pid` wrote to stderr, from this cluster's session logs."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return "".join(p.read_text(errors="replace") for p in logs.glob(f"worker-*-{pid}.err"))


def files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text in p.read_text(errors="replace")]


def coordinator_args(config: WarpConfig, task: Path) -> tuple:
    """The coordinator of the built-in task's gold reward, evaluated beside itself as the control."""
    return config, task / "sft", task / "prompts", RewardSource(function=world.gold_reward), world.gold_reward


@pytest.fixture(scope="module")
def secret_in_the_environment():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", SECRET)
        yield


@dataclass
class FaultedRun:
    config: WarpConfig
    task: Path
    out: Path  # the run's folder, which `killed_and_resumed` goes on in
    coordinator: ray.actor.ActorHandle
    kept: Path  # a copy of `out` as the run ended: what the run's tests read
    killed: dict[str, dict]  # the killers' victims: their rows of Ray's actor table when killed
    reward_server: dict  # the killed reward server's row of the actor table once the run ended
    reward_server_stderr: str  # what its new process wrote to stderr
    reward_servers: int  # how many the coordinator started

    def manifest(self, i: int) -> dict:
        return json.loads((self.kept / f"iteration_{i}" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def faulted_run(tiny_task, ray_cluster, tmp_path_factory, secret_in_the_environment) -> FaultedRun:
    """Two WARP iterations in the coordinator actor, during which a rank of learner 1 (iteration 0),
    the reward server (iteration 0: the gold reward, the proxy and the control in one server) and learner 0's
    rollout engine (iteration 1) are killed. The run's tests read `kept`, a copy of its folder as it
    ended: `killed_and_resumed` changes the folder itself."""
    out = tmp_path_factory.mktemp("warp")
    config = warp_config(out)
    began_ms = time.time() * 1000  # the unit of StartTime in Ray's actor table
    coordinator = (
        ray.remote(num_cpus=0)(Coordinator).options(name=COORDINATOR).remote(*coordinator_args(config, tiny_task))
    )
    killers = {
        "rank": kill_when_training(metrics(out, 0, 1), "LearnerRank", owner="warp-learner-1"),
        "reward server": kill_when_training(metrics(out, 0, 0), "RewardServer", owner=COORDINATOR),
        "engine": kill_when_training(metrics(out, 1, 0), "RolloutWorker", owner="warp-learner-0"),
    }
    try:
        try:
            assert ray.get(coordinator.run.remote(), timeout=RUN_TIMEOUT_S) == out / "iteration_1"
        finally:
            for killer in killers.values():
                killer.stop()
        killed = {what: killer.result() for what, killer in killers.items()}
        kept = shutil.copytree(out, tmp_path_factory.mktemp("warp_as_it_ended"), dirs_exist_ok=True)
        reward_server = actor_table(actor_id=killed["reward server"]["ActorID"])
        row = actor_table(actor_id=coordinator._actor_id.hex())
        # started by its process: by its address, since this fixture began (a dead process's port may be taken again)
        servers = [a for a in actor_table_rows("RewardServer") if a["StartTime"] >= began_ms]
        yield FaultedRun(
            config,
            tiny_task,
            out,
            coordinator,
            kept,
            killed,
            reward_server,
            worker_stderr(reward_server["Pid"]),
            sum(a["OwnerAddress"] == row["Address"] for a in servers),
        )
    finally:
        ray.kill(coordinator)
        free_placement_groups()


@dataclass
class KilledAndResumed:
    out: Path
    error: Optional[Exception]  # what the coordinator's run(resume=True) raised when its process was killed
    killed: dict  # the coordinator's row of Ray's actor table when killed
    complete_after_the_kill: Optional[int]  # the last complete iteration, then
    manifest_after_the_kill: str  # iteration 0's manifest, then


@pytest.fixture(scope="module")
def killed_and_resumed(faulted_run) -> KilledAndResumed:
    """The faulted run's iteration 1 deleted and redone on resume by its coordinator actor, killed
    mid-iteration (what the tests need of that moment is kept before the folder changes again);
    then resumed again, in this process, to the end."""
    out = faulted_run.out
    shutil.rmtree(out / "iteration_1")  # what the faulted run's tests read is in faulted_run.kept
    shutil.rmtree(out / "logs" / "iteration_1")
    killer = kill_when_training(metrics(out, 1, 0), "Coordinator", name=COORDINATOR)
    error = None
    try:
        ray.get(faulted_run.coordinator.run.remote(resume=True), timeout=RUN_TIMEOUT_S)
    except RayActorError as e:  # its learners die with it
        error = e
    finally:
        killer.stop()
    killed = killer.result()
    complete, manifest = last_complete(out), (out / "iteration_0" / "manifest.json").read_text()
    free_placement_groups()
    resumed = Coordinator(*coordinator_args(faulted_run.config, faulted_run.task))
    try:
        resumed.run(resume=True)
    finally:
        resumed.close()
    return KilledAndResumed(out, error, killed, complete, manifest)


def test_every_iteration_is_whole_despite_the_kills(faulted_run):
    for i in (0, 1):
        folder = faulted_run.kept / f"iteration_{i}"
        assert {p.name for p in folder.iterdir()} == ITERATION_FILES
        assert AutoModelForCausalLM.from_pretrained(folder / "model") is not None  # a Hugging Face folder
        index = json.loads((folder / "model" / "model.safetensors.index.json").read_text())
        assert len(index["weight_map"]) > 0  # in 2 shards
        trajectories = json.loads((folder / "trajectories.json").read_text())
        assert [[h["step"] for h in t] for t in trajectories] == [[1, 2, 3, 4]] * 2  # a rerun learner's history, whole
        manifest = faulted_run.manifest(i)
        assert len(set(manifest["seeds"])) == 2 and len(manifest["final_metrics"]) == 2
        assert manifest["rejected"] == []
    assert (faulted_run.kept / "report.md").read_text().count("## Iteration") == 2


def test_the_learners_killed_are_rerun_and_the_manifests_record_it(faulted_run):
    """Learner 1 lost a rank in iteration 0, learner 0 its engine in iteration 1: each was rerun from
    its iteration's init, and each iteration's manifest lists the restarts up to it."""
    restarts = [(r["iteration"], r["policy"], r["error"], r["rerun"]) for r in faulted_run.manifest(1)["restarts"]]
    assert restarts == [(0, 1, "ActorDiedError", True), (1, 0, "ActorDiedError", True)]
    assert len(faulted_run.manifest(0)["restarts"]) == 1


def test_a_killed_reward_server_is_restarted_in_place_and_says_so(faulted_run):
    """Ray starts it again (warp_ray.runtime.SERVICE) and retries the calls in flight: no learner
    is rerun for it (the manifests list only the rank's and the engine's deaths), and the new process
    logs that it replaced a dead one."""
    before, after = faulted_run.killed["reward server"], faulted_run.reward_server
    assert faulted_run.reward_servers == 1  # the gold reward is the proxy and the control: one server serves both
    assert after["State"] == "ALIVE" and after["NumRestarts"] == 1 and after["Pid"] != before["Pid"]
    assert [r["iteration"] for r in faulted_run.manifest(1)["restarts"]] == [0, 1]
    assert "the reward server restarted after its process died" in faulted_run.reward_server_stderr


def test_the_liti_front_has_a_point_per_base_and_eta(faulted_run):
    """From the init and from the SFT (the same model in iteration 0, evaluated once) towards the merge."""
    fronts = [json.loads((faulted_run.kept / f"iteration_{i}" / "front.json").read_text()) for i in (0, 1)]
    for front in fronts:
        assert [(p["towards"], p["eta"]) for p in front] == [(t, e) for t in ("init", "sft") for e in (0.0, 0.5, 1.0)]
    front, next_front = fronts
    init, sft = front[:3], front[3:]  # iteration 0's init is the SFT: every point is the same towards either
    assert init == [{**p, "towards": "init"} for p in sft]
    assert init[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-3)
    assert front[2]["kl_to_sft"] > 0 and "control_reward" in front[2]
    # iteration 1's init is iteration 0's LITI: another model than the SFT, measured on its own
    assert next_front[0] != {**next_front[3], "towards": "init"}
    assert next_front[3]["kl_to_sft"] == pytest.approx(0.0, abs=1e-3)


def test_each_next_init_is_the_slerp_and_liti_of_the_kept_policies(faulted_run):
    """SLERP and LITI of an iteration's kept policies, in one process, give the init it saved."""
    sft = load_model_weights(faulted_run.task / "sft")
    first = load_model_weights(faulted_run.kept / "iteration_0" / "model")
    assert not torch.equal(first[KEY], sft[KEY])
    for i, init in enumerate((sft, first)):
        folder = faulted_run.kept / f"iteration_{i}"
        policies = [load_model_weights(folder / "policies" / f"policy_{m}") for m in (0, 1)]
        assert not torch.equal(policies[0][KEY], policies[1][KEY])
        merged = liti(init, slerp(init, policies), faulted_run.config.warp.eta)
        for name, saved in load_model_weights(folder / "model").items():
            torch.testing.assert_close(merged[name], saved, rtol=0, atol=1e-6, msg=name)


def test_no_secret_from_the_environment_reaches_the_runs_files(faulted_run, killed_and_resumed):
    assert files_holding(faulted_run.kept, SECRET) == []
    assert files_holding(killed_and_resumed.out, SECRET) == []


def test_a_coordinator_killed_mid_iteration_leaves_the_last_complete_iteration_intact(faulted_run, killed_and_resumed):
    assert isinstance(killed_and_resumed.error, RayActorError), killed_and_resumed.error
    assert killed_and_resumed.killed["ActorClassName"] == "Coordinator"
    assert killed_and_resumed.complete_after_the_kill == 0
    assert (
        killed_and_resumed.manifest_after_the_kill == (faulted_run.kept / "iteration_0" / "manifest.json").read_text()
    )


def test_resuming_gives_the_same_init_as_the_uninterrupted_run(faulted_run, killed_and_resumed):
    """Iteration 1 redone from iteration 0's checkpoint, with the same seeds."""
    uninterrupted = load_model_weights(faulted_run.kept / "iteration_1" / "model")
    for name, tensor in load_model_weights(killed_and_resumed.out / "iteration_1" / "model").items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-6, msg=name)


def test_resuming_refuses_a_changed_config(killed_and_resumed):
    with pytest.raises(ConfigError, match="warp.beta was 0.02 in that run and is now 0.5"):
        resume_from(killed_and_resumed.out, 1, warp_config(killed_and_resumed.out, beta=0.5))
