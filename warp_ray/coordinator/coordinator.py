"""The coordinator: WARP's Algorithm 1 (arXiv 2406.16768) on Ray.

    theta_init <- theta_sft
    for i in 1..I:
        for m in 1..M, in parallel:  REINFORCE from theta_init, KL to its own EMA, for T steps -> theta_m
        theta_slerp <- SLERP(theta_init, theta_1..theta_M)          (per tensor, of the task vectors)
        theta_init  <- (1 - eta) * theta_init + eta * theta_slerp    (LITI)
    return theta_init

`Coordinator.run` is that loop (docs/algorithms.md#algorithm-1). Ray stays in the helpers: the
learners are actors kept across iterations (warp_ray/coordinator/learners.py); every model is
sharded in the object store (warp_ray/shards.py), so the init reaches the learners with one copy
per node and the merges run beside the learners with only Gram matrices meeting here
(warp_ray/coordinator/distributed_merge.py, on warp_ray.merge's pure functions); every
iteration ends with its LITI front evaluated and a checkpoint written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup

from warp_ray.checkpoint import save_model
from warp_ray.config import WarpConfig
from warp_ray.coordinator import distributed_merge
from warp_ray.coordinator.checkpoints import iteration_dir, last_complete, resume_from, save_iteration
from warp_ray.coordinator.front import plot_front, report
from warp_ray.coordinator.learners import LearnerGroup, run_seed, start_learner
from warp_ray.coordinator.wandb_run import WandbRun
from warp_ray.data import prompt_splits, read_prompts
from warp_ray.evaluation import Evaluator, start_reference
from warp_ray.reward.server import RewardServer, RewardSource, start_reward_server
from warp_ray.shards import Shards, partition, put_folder, wait_until_computed
from warp_ray.timing import Laps

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self,
        config: WarpConfig,
        sft: Path,
        prompts: Path,
        reward: RewardSource | ActorHandle,
        control: Optional[Callable[[str, str], float]] = None,
        progress: Optional[ActorHandle] = None,
        name: str = "warp",
    ):
        """`reward`: what the proxy reward server hosts, or a server already started (shared with
        other runs, as a rewarded soup's are); `control`: a reward evaluated beside it
        (the built-in task's gold reward), or None; `progress`: a `warp_ray.progress.ProgressBoard`
        told each stage, to which the learners report their steps; `name`: the learners' actors are
        <name>-learner-<m> (runs at once on one cluster need names of their own)."""
        self.config = config
        self.sft_folder = Path(sft)
        self.out = Path(config.paths.output_dir)
        self.layout = partition(self.sft_folder, config.learner_bounds()[1])  # a shard per learner: the merge's unit
        self.sft = put_folder(self.sft_folder, self.layout)
        trust = config.paths.trust_remote_code
        source = reward if isinstance(reward, RewardSource) else None
        self.reward_server = start_reward_server(source, config.reward_server, trust) if source else reward
        if source is not None and control is not None and source.function is control:
            control_server = self.reward_server  # warp.proxy_reward = gold: one server serves both
        else:
            control_server = RewardServer.remote(RewardSource(function=control)) if control else None
        splits = prompt_splits(prompts)
        evaluator = Evaluator(
            config,
            read_prompts(splits["held_out"], config.data),
            self.reward_server,
            start_reference(sft, config),
            control_server,
        )
        train_prompts = read_prompts(splits["train"], config.data)

        def make_learner(m: int, group: PlacementGroup):  # in its group, on its node: the policy's shards stay there
            return start_learner(
                config, sft, train_prompts, self.reward_server, m, evaluator, group, name=f"{name}-learner-{m}"
            )

        self.learners = LearnerGroup(config, make_learner, self.out / "logs", progress)
        self.progress = progress
        self.wandb = WandbRun(config) if config.logging.wandb else None

    def run(self, resume: bool = False) -> Path:
        """Algorithm 1; returns the folder of the last iteration (its model/ is the final policy)."""
        warp = self.config.warp
        start, init = self.starting_point(resume)
        for i in range(start, warp.I):
            placed = self.learners.scale()  # as many as the cluster holds, within learners.min and max
            self.stage(f"WARP iteration {i}: {placed} learners, {warp.T} REINFORCE steps each")
            laps = Laps()
            # M RL runs from the init, each with its own EMA anchor
            policies, trajectories = self.learners.train(init, i, self.layout)
            laps("train")
            hosts = self.learners.handles  # the merges run on the learners, a shard each
            merged = distributed_merge.slerp(init, policies, warp.slerp_weights(), hosts)
            next_init = distributed_merge.liti(init, merged, warp.eta, hosts)
            wait_until_computed(next_init)
            laps("merge")
            self.stage(f"WARP iteration {i}: SLERP and LITI done; the LITI front on held-out prompts")
            front = self.front({"init": init, "sft": self.sft}, merged)
            laps("front")
            init = next_init
            self.save(i, init, front, trajectories, laps, policies)
        return iteration_dir(self.out, warp.I - 1)

    def stage(self, stage: str) -> None:
        log.info(stage)
        if self.progress is not None:
            self.progress.set_stage.remote(stage)

    def close(self, failed: bool = False) -> None:
        """Free the learners' placement groups (the learners and their engines end with them); end the
        W&B run, as failed or not."""
        self.learners.close()
        if self.wandb is not None:
            self.wandb.finish(failed)
            self.wandb = None

    def starting_point(self, resume: bool) -> tuple[int, Shards]:
        done = last_complete(self.out) if resume else None
        if done is None:
            return 0, self.sft
        log.info("resuming after iteration %d of %s", done, self.out)
        return done + 1, put_folder(resume_from(self.out, done, self.config), self.layout)

    def front(self, bases: dict[str, Shards], merged: Shards) -> list[dict]:
        """The LITI front on held-out prompts, evaluated on the learners' engines, a point each at a
        time. Bases that are one model (iteration 0's init is the SFT) are evaluated once."""
        towards, etas = self.config.evaluation.front_towards, self.config.evaluation.front_etas
        learners = self.learners.handles
        first_name = {t: next(u for u in towards if bases[u] is bases[t]) for t in towards}
        points = [(t, eta) for t in towards if first_name[t] == t for eta in etas]
        measured = {}
        for first in range(0, len(points), len(learners)):
            wave = points[first : first + len(learners)]
            weights = [distributed_merge.liti(bases[t], merged, eta, learners) for t, eta in wave]
            measured.update(zip(wave, ray.get([h.evaluate_weights.remote(w) for h, w in zip(learners, weights)])))
        return [{"towards": t, "eta": eta, **measured[first_name[t], eta]} for t in towards for eta in etas]

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
                for m, policy in zip(self.learners.merged, policies):
                    (kept := folder / "policies" / f"policy_{m}").mkdir(parents=True)
                    save_model((ray.get(shard) for shard in policy), self.sft_folder, kept, len(policy))
            (folder / "front.json").write_text(json.dumps(front, indent=2))
            (folder / "trajectories.json").write_text(json.dumps(trajectories))
            title = f"WARP iteration {i}: LITI front and training runs"
            plot_front(front, trajectories, self.learners.merged, folder / "front.png", title)
            final = [history[-1] for history in trajectories]
            (folder / "report.md").write_text(report(front, final, self.learners.merged, i))

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
        if self.wandb is not None:
            self.wandb.log_iteration(i, self.learners.merged, trajectories, front, folder / "front.png")
        log.info("iteration %d written to %s", i, folder)
