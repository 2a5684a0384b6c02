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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Optional

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from warp_ray.config import WarpConfig
from warp_ray.errors import NonFiniteError, TooFewLearners
from warp_ray.learner.learner import Learner, bundles, learner_options
from warp_ray.runtime import remote_cause
from warp_ray.shards import Layout, Shards

log = logging.getLogger(__name__)
_RemoteLearner = ray.remote(Learner)  # started by `start_learner`, which places it
LEARNER_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)
MakeLearner = Callable[[int, PlacementGroup], ray.actor.ActorHandle]


Run = tuple[ray.ObjectRef, ray.ObjectRef]
"""One learner's RL run under way: its policy's shards and its metric history, when they come."""


class Slot(NamedTuple):
    """A placed learner: its actor and the placement group that holds its ranks and engines."""

    learner: ray.actor.ActorHandle
    group: PlacementGroup


class Trained(NamedTuple):
    """What a learner's run returns: its policy (shards in the object store) and its metrics."""

    policy: Shards
    history: list[dict]


@dataclass
class Outcome:
    """How a learner's run ended: trained (with its result), rejected (non-finite: its seed would
    give the same run again) or died (its process, a rank's or an engine's: rerun it)."""

    kind: Literal["trained", "rejected", "died"]
    result: Trained | None = None
    reason: str = ""  # why rejected, or the error's name when died


def outcome(run: Run) -> Outcome:
    try:
        return Outcome("trained", result=Trained(*ray.get(list(run))))
    except NonFiniteError as e:
        return Outcome("rejected", reason=str(remote_cause(e)))
    except RayError as e:
        cause = remote_cause(e)  # a rank's or engine's death comes through its learner
        if not isinstance(cause, LEARNER_DIED):
            raise
        return Outcome("died", reason=type(cause).__name__)


def first_to_end(runs: dict[int, Run]) -> int:
    """The learner whose run ends first, trained or not (its policy ref resolves or fails)."""
    done, _ = ray.wait([policy for policy, _ in runs.values()], num_returns=1)
    return next(m for m, (policy, _) in runs.items() if policy == done[0])


def start_learner(
    config: WarpConfig,
    sft: str | Path,
    prompts: list,
    reward_server: ActorHandle,
    seed: int,
    evaluator=None,
    group: Optional[PlacementGroup] = None,
    name: Optional[str] = None,
) -> ActorHandle:
    """A learner as an actor (`Learner`'s arguments), in placement group `group` if given. Colocated
    (resources.colocate) with one rank, it is one process: its rank and the rank's engine run in it."""
    options = learner_options(config, group) | ({"name": name} if name else {})
    return _RemoteLearner.options(**options).remote(
        config, str(sft), prompts, reward_server, seed=seed, evaluator=evaluator, placement_group=group, host_rank=True
    )


def run_seed(seed: int, iteration: int, m: int) -> int:
    """The seed of policy m in iteration i: its prompt order and sampling draws (Algorithm 1's runs differ by it)."""
    return (seed * 1_000 + iteration) * 1_000 + m


class LearnerGroup:
    def __init__(
        self, config: WarpConfig, make_learner: MakeLearner, log_dir: Path, progress: Optional[ActorHandle] = None
    ):
        self.config = config
        self.make_learner = make_learner
        self.log_dir = log_dir
        self.progress = progress  # a warp_ray.progress.ProgressBoard the learners report their steps to
        self.slots: list[Slot] = []
        self.restarts: list[dict] = []  # what died, and what was done, for the manifests
        self.rejected: list[dict] = []  # policies left out of a merge, and why
        self.merged: list[int] = []  # the learners whose policies the last `train` returned, in order
        self.pending: list[PlacementGroup] = []  # requests not yet met: the autoscaler's demand

    @property
    def handles(self) -> list[ray.actor.ActorHandle]:
        """The placed learners' actors, in order."""
        return [learner for learner, _ in self.slots]

    def scale(self) -> int:
        """Place learners until `learners.max`: the first `learners.min` within
        `learners.scale_up_timeout_s`, each further one within `learners.place_timeout_s`. A request
        not met stays pending, so that an autoscaler keeps adding the nodes it needs, and is used
        by a later call once met. Refuses, before starting any, if fewer than `learners.min` fit.
        Returns how many."""
        low, high = self.config.learner_bounds()
        waits = self.config.learners
        scale_up = waits.scale_up_timeout_s or waits.place_timeout_s
        deadline = time.monotonic() + scale_up
        while len(self.slots) + len(self.pending) < low:  # requested together: an autoscaler sees them all
            self.pending.append(placement_group(bundles(self.config), strategy="PACK"))
        groups = []
        while len(self.slots) + len(groups) < high:
            group = self.pending.pop(0) if self.pending else placement_group(bundles(self.config), strategy="PACK")
            needed = len(self.slots) + len(groups) < low
            # At least a second: Ray waits in whole seconds, and a group met a moment ago must read as met.
            if not group.wait(max(1.0, deadline - time.monotonic()) if needed else waits.place_timeout_s):
                self.pending.append(group)
                break
            groups.append(group)
        if len(self.slots) + len(groups) < low:
            for group in groups + self.pending:
                remove_placement_group(group)
            self.pending = []
            has = ", ".join(
                f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}"
                for k, v in sorted(ray.cluster_resources().items())
                if k in ("CPU", "GPU", "memory")
            )
            raise TooFewLearners(
                f"the cluster placed {len(self.slots) + len(groups)} learner(s) within "
                f"{scale_up:g} s, fewer than learners.min = {low}: each takes "
                f"{bundles(self.config)} (resources.*) and the cluster has {has}; lower warp.M or "
                "learners.min, ask less per learner, or add nodes"
            )
        for group in groups:
            self.slots.append(Slot(self.make_learner(len(self.slots), group), group))
        return len(self.slots)

    def train(self, init: Shards, iteration: int, layout: Layout) -> tuple[list[Shards], list[list[dict]]]:
        """The policies trained for T steps from `init` by the placed learners, each left in the
        object store on its learner's node cut along `layout`, and their metric histories."""
        runs = {m: self._run(m, init, iteration, layout) for m in range(len(self.slots))}
        results, deaths = {}, dict.fromkeys(runs, 0)
        while runs:
            m = first_to_end(runs)
            ended = outcome(runs.pop(m))
            if ended.kind == "trained":
                results[m] = ended.result
            elif ended.kind == "rejected":
                self._reject(iteration, m, ended.reason)
            else:
                deaths[m] += 1
                if self._after_death(iteration, m, ended.reason, deaths[m]):
                    runs[m] = self._run(m, init, iteration, layout)
        return self._survivors(iteration, results)

    def _reject(self, iteration: int, m: int, reason: str) -> None:
        log.warning("learner %d is left out of iteration %d's merge: %s", m, iteration, reason)
        self.rejected.append({"iteration": iteration, "policy": m, "reason": reason})

    def _after_death(self, iteration: int, m: int, error: str, deaths: int) -> bool:
        """The decision once learner m died: rerun it if it died at most `resources.learner_retries`
        times and its placement group is placed (one lost with its node waits for Ray to place it
        elsewhere, for at most `learners.place_timeout_s`), replaced by a fresh actor in its group;
        else go on without it. Logs and records the decision; says whether to rerun."""
        group, timeout = self.slots[m].group, self.config.learners.place_timeout_s
        placed = group.wait(timeout)
        rerun = placed and deaths <= self.config.resources.learner_retries
        if rerun:
            action = "rerunning it from the iteration's init"
        elif placed:
            retries = self.config.resources.learner_retries
            action = f"going on without it: it died {deaths} time(s), past resources.learner_retries = {retries}"
        else:
            action = f"going on without it: its placement group was not placed again within {timeout:g} s"
        log.warning("learner %d died in iteration %d (%s); %s", m, iteration, error, action)
        self.restarts.append({"iteration": iteration, "policy": m, "error": error, "rerun": rerun})
        if rerun:
            ray.kill(self.slots[m].learner)  # if only its ranks died, the learner itself is still there
            self.slots[m] = Slot(self.make_learner(m, group), group)
        return rerun

    def _survivors(self, iteration: int, results: dict[int, Trained]) -> tuple[list[Shards], list[list[dict]]]:
        """The trained policies and histories, in learner order, once every run has ended; the
        learners that died for good are dropped (a rejected one's processes are fine)."""
        low = self.config.learner_bounds()[0]
        rejected = sorted((r for r in self.rejected if r["iteration"] == iteration), key=lambda r: r["policy"])
        if len(results) < low:
            raise TooFewLearners(
                f"{len(results)} learner(s) ended iteration {iteration} with a usable policy, fewer than "
                f"learners.min = {low}" + "".join(f"; learner {r['policy']}: {r['reason']}" for r in rejected)
            )
        self._drop(set(range(len(self.slots))) - set(results) - {r["policy"] for r in rejected})
        self.merged = sorted(results)
        return [results[m].policy for m in self.merged], [results[m].history for m in self.merged]

    def _run(self, m: int, init: Shards, iteration: int, layout: Layout) -> Run:
        """Queue one RL run on learner m (an actor runs its calls in order): start, T steps, shard the policy."""
        learner = self.slots[m].learner
        log_dir = self.log_dir / f"iteration_{iteration}" / f"policy_{m}"
        # `init` is a list of references: passed on to the learner as such, not fetched here.
        learner.set_weights.remote(init, run_seed(self.config.warp.seed, iteration, m))
        history = learner.run.remote(self.config.warp.T, log_dir, f"policy {m}", self.progress)
        return learner.put_weights.remote(layout), history

    def _drop(self, dead: set[int]) -> None:
        for m in dead:
            ray.kill(self.slots[m].learner)
            remove_placement_group(self.slots[m].group)
        self.slots = [slot for m, slot in enumerate(self.slots) if m not in dead]

    def close(self) -> None:
        """End every learner and free its placement group, and withdraw the requests still pending."""
        self._drop(set(range(len(self.slots))))
        for group in self.pending:
            remove_placement_group(group)
        self.pending = []
