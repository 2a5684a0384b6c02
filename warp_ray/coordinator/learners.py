"""The learners of a WARP run, as Ray actors: placed elastically, kept across iterations, rerun
when they die.

Each learner lives in a placement group of its own (its K ranks and its engines, `bundles`),
and drives its ranks and engines (its children: when a learner dies, Ray ends them with it).
Before every iteration the group places as many learners as the cluster can hold within
`learners.min` and `learners.max` (`scale`): a cluster that grew gets more, one that shrank
fewer. A learner whose process dies mid-iteration is replaced in its placement group and rerun
from the iteration's init with the same seed, up to `resources.learner_retries` times; past
that it is dropped and the survivors are merged, if there are at least `learners.min` of them.
A learner whose rewards or policy hold NaN or Inf is not rerun (its seed would give the same
run again): its policy is left out of the merge, under the same `learners.min` rule.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from warp_ray.config import WarpConfig
from warp_ray.errors import NonFiniteError, TooFewLearners
from warp_ray.learner.learner import Learner, bundles
from warp_ray.shards import Shards

log = logging.getLogger(__name__)
RemoteLearner = ray.remote(num_cpus=0)(Learner)  # the learner's ranks and engines hold the resources
LEARNER_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)
MakeLearner = Callable[[int, PlacementGroup], ray.actor.ActorHandle]


def run_seed(seed: int, iteration: int, m: int) -> int:
    """The seed of policy m in iteration i: its prompt order and sampling draws (Algorithm 1's runs differ by it)."""
    return (seed * 1_000 + iteration) * 1_000 + m


class LearnerGroup:
    def __init__(self, config: WarpConfig, make_learner: MakeLearner, log_dir: Path):
        self.config, self.make_learner, self.log_dir = config, make_learner, log_dir
        self.slots: list[tuple[ray.actor.ActorHandle, PlacementGroup]] = []
        self.restarts: list[dict] = []  # what died, and what was done, for the manifests
        self.rejected: list[dict] = []  # policies left out of a merge, and why
        self.merged: list[int] = []  # the learners whose policies the last `train` returned, in order

    @property
    def learners(self) -> list[ray.actor.ActorHandle]:
        return [learner for learner, _ in self.slots]

    def scale(self) -> int:
        """Place learners until `learners.max`, or until the cluster cannot hold one more within
        `learners.place_timeout_s`; refuse, before starting any, if fewer than `learners.min` fit.
        Returns how many."""
        low, high = self.config.learner_bounds()
        groups = []
        while len(self.slots) + len(groups) < high:
            group = placement_group(bundles(self.config), strategy="PACK")
            if not group.wait(self.config.learners.place_timeout_s):
                remove_placement_group(group)
                break
            groups.append(group)
        if len(self.slots) + len(groups) < low:
            for group in groups:
                remove_placement_group(group)
            has = ", ".join(
                f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}"
                for k, v in sorted(ray.cluster_resources().items())
                if k in ("CPU", "GPU", "memory")
            )
            raise TooFewLearners(
                f"the cluster placed {len(self.slots) + len(groups)} learner(s) within "
                f"{self.config.learners.place_timeout_s:g} s, fewer than learners.min = {low}: each takes "
                f"{bundles(self.config)} (resources.*) and the cluster has {has}; lower warp.M or "
                "learners.min, ask less per learner, or add nodes"
            )
        for group in groups:
            self.slots.append((self.make_learner(len(self.slots), group), group))
        return len(self.slots)

    def train(self, init: Shards, iteration: int, names: list[list[str]]) -> tuple[list[Shards], list[list[dict]]]:
        """The policies trained for T steps from `init` by the placed learners, each left in the
        object store on its learner's node cut along `names`, and their metric histories."""
        runs = {m: self._run(m, init, iteration, names) for m in range(len(self.slots))}
        results, failures = {}, dict.fromkeys(runs, 0)
        while runs:
            done, _ = ray.wait([policy for policy, _ in runs.values()], num_returns=1)  # the first to end, or die
            m = next(m for m, (policy, _) in runs.items() if policy == done[0])
            try:
                results[m] = ray.get(list(runs.pop(m)))
                continue
            except NonFiniteError as e:
                reason = str(
                    e.cause if isinstance(e, RayTaskError) else e
                )  # the learner's message, without Ray's traceback
                log.warning("learner %d is left out of iteration %d's merge: %s", m, iteration, reason)
                self.rejected.append({"iteration": iteration, "policy": m, "reason": reason})
                continue
            except RayError as e:
                cause = (
                    e.cause if isinstance(e, RayTaskError) else e
                )  # a rank's or engine's death comes through the learner
                if not isinstance(cause, LEARNER_DIED):
                    raise
                failures[m] += 1
                error = type(cause).__name__
            group = self.slots[m][1]
            # A learner lost with its node waits for Ray to place its group again, elsewhere: not forever.
            placed = group.wait(self.config.learners.place_timeout_s)
            retry = failures[m] <= self.config.resources.learner_retries and placed
            log.warning(
                "learner %d died in iteration %d (%s); %s",
                m,
                iteration,
                error,
                "rerunning it from the iteration's init"
                if retry
                else "going on without it"
                + (
                    ""
                    if placed
                    else f": its placement group was not placed again within {self.config.learners.place_timeout_s:g} s"
                ),
            )
            self.restarts.append({"iteration": iteration, "policy": m, "error": error, "rerun": retry})
            if retry:
                ray.kill(self.slots[m][0])  # if only its ranks died, the learner itself is still there
                self.slots[m] = (self.make_learner(m, group), group)
                runs[m] = self._run(m, init, iteration, names)
        low = self.config.learner_bounds()[0]
        rejected = sorted((r for r in self.rejected if r["iteration"] == iteration), key=lambda r: r["policy"])
        if len(results) < low:
            raise TooFewLearners(
                f"{len(results)} learner(s) ended iteration {iteration} with a usable policy, fewer than "
                f"learners.min = {low}" + "".join(f"; learner {r['policy']}: {r['reason']}" for r in rejected)
            )
        self._drop(
            set(range(len(self.slots))) - set(results) - {r["policy"] for r in rejected}
        )  # a rejected learner's processes are fine
        self.merged = sorted(results)
        return [results[m][0] for m in self.merged], [results[m][1] for m in self.merged]

    def _run(self, m: int, init: Shards, iteration: int, names: list[list[str]]) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """Queue one RL run on learner m (an actor runs its calls in order): start, T steps, shard the policy."""
        learner, log_dir = self.slots[m][0], self.log_dir / f"iteration_{iteration}" / f"policy_{m}"
        learner.set_weights.remote(
            init, run_seed(self.config.warp.seed, iteration, m)
        )  # references in a list: passed on, not fetched
        history = learner.run.remote(self.config.warp.T, log_dir, desc=f"iteration {iteration} policy {m}")
        return learner.put_weights.remote(names), history

    def _drop(self, dead: set[int]) -> None:
        for m in dead:
            ray.kill(self.slots[m][0])
            remove_placement_group(self.slots[m][1])
        self.slots = [slot for m, slot in enumerate(self.slots) if m not in dead]

    def close(self) -> None:
        """End every learner and free its placement group."""
        self._drop(set(range(len(self.slots))))
