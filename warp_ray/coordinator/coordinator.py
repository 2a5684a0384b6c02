"""The coordinator: WARP's Algorithm 1 (arXiv 2406.16768) on Ray.

    theta_init <- theta_sft
    for i in 1..I:
        for m in 1..M, in parallel:  REINFORCE from theta_init, KL to its own EMA, for T steps -> theta_m
        theta_slerp <- SLERP(theta_init, theta_1..theta_M)          (per tensor, of the task vectors)
        theta_init  <- (1 - eta) * theta_init + eta * theta_slerp    (LITI)
    return theta_init

`Coordinator.run` is that loop. Ray stays in the helpers: the learners are actors kept across
iterations (warp_ray/coordinator/learners.py); every model is sharded in the object store
(warp_ray/shards.py), so the init reaches the learners with one copy per node and the merges
run beside the learners with only Gram matrices meeting here
(warp_ray/coordinator/distributed_merge.py, on warp_ray.merge's pure functions); every
iteration ends with its LITI front evaluated and a checkpoint written atomically.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from warp_ray.checkpoint import save_model
from warp_ray.config import WarpConfig
from warp_ray.coordinator import distributed_merge
from warp_ray.coordinator.checkpoints import iteration_dir, last_complete, resume_from, save_iteration
from warp_ray.coordinator.front import plot_front, report
from warp_ray.coordinator.learners import LearnerGroup, RemoteLearner, run_seed
from warp_ray.data import read_prompts
from warp_ray.errors import WarpRayError
from warp_ray.evaluation import Evaluator, ReferencePolicy
from warp_ray.reward.server import RewardServer
from warp_ray.shards import Shards, partition, put_folder

log = logging.getLogger(__name__)


class Laps(dict):
    """Seconds since the previous lap (or the start), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self[name], self.last = now - self.last, now


class Coordinator:
    def __init__(self, config: WarpConfig, sft: Path, prompts: Path, reward: tuple[str, list[str]], control: bool):
        """`reward`: the proxy reward server's (kind, folders); `control`: evaluate the gold reward too."""
        self.config, self.sft_folder, self.out = config, Path(sft), Path(config.paths.output_dir)
        self.names = partition(
            self.sft_folder, config.learner_bounds()[1]
        )  # a shard per learner: the merge's unit of work
        self.sft = put_folder(self.sft_folder, self.names)
        trust = config.paths.trust_remote_code
        self.reward_server = RewardServer.remote(*reward, params=config.reward_server, trust_remote_code=trust)
        control_server = RewardServer.remote("gold") if control else None
        evaluator = Evaluator(
            config,
            read_prompts(Path(prompts) / "held_out.jsonl"),
            self.reward_server,
            ReferencePolicy.remote(str(sft), trust_remote_code=trust),
            control_server,
        )
        train_prompts = read_prompts(Path(prompts) / "train.jsonl")

        def make_learner(m: int, group: PlacementGroup):  # in its group, on its node: the policy's shards stay there
            return RemoteLearner.options(
                name=f"warp-learner-{m}", scheduling_strategy=PlacementGroupSchedulingStrategy(group)
            ).remote(
                config, str(sft), train_prompts, self.reward_server, seed=m, evaluator=evaluator, placement_group=group
            )

        self.learners = LearnerGroup(config, make_learner, self.out / "logs")

    def run(self, resume: bool = False) -> Path:
        """Algorithm 1; returns the folder of the last iteration (its model/ is the final policy)."""
        warp = self.config.warp
        start, init = self.starting_point(resume)
        for i in range(start, warp.I):
            log.info(
                "iteration %d: %d learners", i, self.learners.scale()
            )  # as many as the cluster holds, within bounds
            laps = Laps()
            policies, trajectories = self.learners.train(
                init, i, self.names
            )  # M RL runs from init, each with its EMA anchor
            laps("train")
            hosts = self.learners.learners  # the merge runs on the survivors, by shard
            merged = distributed_merge.slerp(
                init, policies, warp.slerp_weights(), hosts
            )  # SLERP of the M task vectors, per tensor
            next_init = distributed_merge.liti(init, merged, warp.eta, hosts)  # LITI towards the init
            ray.wait(next_init, num_returns=len(next_init), fetch_local=False)
            laps("merge")
            front = self.front({"init": init, "sft": self.sft}, merged)
            laps("front")
            init = next_init
            self.save(i, init, front, trajectories, laps, policies)
        return iteration_dir(self.out, warp.I - 1)

    def close(self) -> None:
        """Free the learners' placement groups (the learners and their engines end with them)."""
        self.learners.close()

    def starting_point(self, resume: bool) -> tuple[int, Shards]:
        done = last_complete(self.out) if resume else None
        if done is None:
            return 0, self.sft
        log.info("resuming after iteration %d of %s", done, self.out)
        return done + 1, put_folder(resume_from(self.out, done, self.config), self.names)

    def front(self, bases: dict[str, Shards], merged: Shards) -> list[dict]:
        """The LITI front on held-out prompts, evaluated on the learners' engines, a point each at a time."""
        evaluation, learners = self.config.evaluation, self.learners.learners
        points = iter(
            [{"towards": towards, "eta": eta} for towards in evaluation.front_towards for eta in evaluation.front_etas]
        )
        front = []
        for wave in iter(lambda: list(itertools.islice(points, len(learners))), []):
            weights = [distributed_merge.liti(bases[p["towards"]], merged, p["eta"], learners) for p in wave]
            front += [
                {**p, **m}
                for p, m in zip(
                    wave, ray.get([learner.evaluate_weights.remote(w) for learner, w in zip(learners, weights)])
                )
            ]
        return front

    def save(
        self,
        i: int,
        init: Shards,
        front: list[dict],
        trajectories: list[list[dict]],
        seconds: Laps,
        policies: list[Shards],
    ) -> None:
        warp = self.config.warp

        def extras(folder: Path) -> None:
            if self.config.paths.keep_policies:
                for m, policy in enumerate(policies):
                    (kept := folder / "policies" / f"policy_{m}").mkdir(parents=True)
                    save_model((ray.get(shard) for shard in policy), self.sft_folder, kept, len(policy))
            (folder / "front.json").write_text(json.dumps(front, indent=2))
            (folder / "trajectories.json").write_text(json.dumps(trajectories))
            plot_front(front, trajectories, folder / "front.png", f"WARP iteration {i}: LITI front and training runs")
            (folder / "report.md").write_text(report(front, [history[-1] for history in trajectories], i))

        manifest = {
            "iteration": i,
            "config": self.config.model_dump(mode="json"),
            "seeds": [run_seed(warp.seed, i, m) for m in self.learners.merged],
            "final_metrics": [history[-1] for history in trajectories],
            "restarts": self.learners.restarts,
            "rejected": self.learners.rejected,
            "seconds": seconds,
        }
        folder = save_iteration(
            self.out, i, (ray.get(shard) for shard in init), len(init), self.sft_folder, manifest, extras
        )
        reports = [iteration_dir(self.out, k) / "report.md" for k in range(i + 1)]
        (self.out / "report.md").write_text("# WARP run\n\n" + "\n".join(r.read_text() for r in reports if r.is_file()))
        log.info("iteration %d written to %s", i, folder)


def run_warp(config: WarpConfig, resume: bool = False) -> Path:
    """`warp-ray warp`: the inputs (the built-in task unless the config names others; the WARM
    reward model, trained first unless given, already trained on these inputs with these settings,
    or warp.proxy_reward is gold), then Algorithm 1 in the coordinator actor."""
    from warp_ray.coordinator.inputs import check_run_inputs
    from warp_ray.reward.warm import is_trained_on, run_warm
    from warp_ray.runtime import init_ray
    from warp_ray.task.build import task_inputs

    sft, prompts, preferences, _ = task_inputs(config)
    builtin, warm = config.paths.sft_model is None, config.paths.output_dir / "rm" / "warm"
    if config.paths.reward_model is not None:
        reward = ("model", [str(config.paths.reward_model)])
    elif builtin and config.warp.proxy_reward == "gold":
        reward = ("gold", [])
    else:
        if not is_trained_on(config, sft, preferences):  # none yet, or trained on another task or with other settings
            run_warm(config)
        reward = ("model", [str(warm)])
    check_run_inputs(config, sft, prompts, Path(reward[1][0]) if reward[1] else None)
    init_ray()
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(config, sft, prompts, reward, control=builtin)
    try:
        return ray.get(coordinator.run.remote(resume))
    except RayActorError as e:
        done = last_complete(config.paths.output_dir)
        raise WarpRayError(
            f"the coordinator's process died ({type(e).__name__}); "
            + (
                "no iteration was complete"
                if done is None
                else f"iterations up to {done} are complete in {config.paths.output_dir}"
            )
            + ": run the same command with --resume to continue"
        ) from None
    finally:
        try:
            ray.get(coordinator.close.remote())
        except RayActorError:
            pass  # the coordinator is gone, and its learners with it
