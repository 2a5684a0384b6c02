"""The learners of a WARP run, as Ray actors: placed elastically, kept across iterations, rerun
when they die.

Each learner lives in a placement group of its own (its K ranks and its engines, `bundles`),
and drives its ranks and engines (its children: when a learner dies, Ray ends them with it).
Before every iteration the group places as many learners as the cluster can hold within
`learners.min` and `learners.max` (`scale`): a cluster that grew gets more, one that shrank
fewer. A learner whose process dies mid-iteration is replaced in its placement group and rerun
from the iteration's init with the same seed, up to `resources.learner_retries` times; past
that it is dropped and the survivors are merged, if there are at least `learners.min` of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from warp_ray.config import WarpConfig
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

    @property
    def learners(self) -> list[ray.actor.ActorHandle]:
        return [learner for learner, _ in self.slots]

    def scale(self) -> int:
        """Place learners until `learners.max`, or until the cluster cannot hold one more within
        `learners.place_timeout_s`; fail if fewer than `learners.min` fit. Returns how many."""
        low, high = self.config.learner_bounds()
        while len(self.slots) < high:
            group = placement_group(bundles(self.config), strategy="PACK")
            if not group.wait(self.config.learners.place_timeout_s):
                remove_placement_group(group)
                break
            self.slots.append((self.make_learner(len(self.slots), group), group))
        if len(self.slots) < low:
            raise RuntimeError(f"the cluster placed {len(self.slots)} learner(s) of {bundles(self.config)} each within "
                               f"{self.config.learners.place_timeout_s:g} s, fewer than learners.min = {low}")
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
            except LEARNER_DIED as e:
                failures[m] += 1
                error = type(e).__name__
            group = self.slots[m][1]
            # A learner lost with its node waits for Ray to place its group again, elsewhere: not forever.
            placed = group.wait(self.config.learners.place_timeout_s)
            retry = failures[m] <= self.config.resources.learner_retries and placed
            log.warning("learner %d died in iteration %d (%s); %s", m, iteration, error,
                        "rerunning it from the iteration's init" if retry else
                        "going on without it" + ("" if placed else f": its placement group was not placed again within "
                                                                  f"{self.config.learners.place_timeout_s:g} s"))
            self.restarts.append({"iteration": iteration, "policy": m, "error": error, "rerun": retry})
            if retry:
                ray.kill(self.slots[m][0])  # if only its ranks died, the learner itself is still there
                self.slots[m] = (self.make_learner(m, group), group)
                runs[m] = self._run(m, init, iteration, names)
        low = self.config.learner_bounds()[0]
        if len(results) < low:
            raise RuntimeError(f"{len(results)} learner(s) finished iteration {iteration}, fewer than learners.min = {low}")
        self._drop(set(range(len(self.slots))) - set(results))
        return [results[m][0] for m in sorted(results)], [results[m][1] for m in sorted(results)]

    def _run(self, m: int, init: Shards, iteration: int, names: list[list[str]]) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """Queue one RL run on learner m (an actor runs its calls in order): start, T steps, shard the policy."""
        learner, log_dir = self.slots[m][0], self.log_dir / f"iteration_{iteration}" / f"policy_{m}"
        learner.set_weights.remote(init, run_seed(self.config.warp.seed, iteration, m))  # references in a list: passed on, not fetched
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
