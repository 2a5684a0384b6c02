"""The M learners of a WARP run, as Ray actors, kept across iterations and retried when they die.

Each learner actor drives its own ranks and rollout engines (they are its children: when a
learner dies, Ray ends them with it). An iteration hands every learner the init through the
object store, runs the M RL runs in parallel and gathers their policies. A learner whose
process dies mid-iteration is replaced by a new one and rerun from the same init with the same
seed, up to `resources.learner_retries` times; the run fails only when that is spent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from warp_ray.config import WarpConfig
from warp_ray.learner.learner import Learner

log = logging.getLogger(__name__)
RemoteLearner = ray.remote(num_cpus=0)(Learner)  # the learner's ranks and engines hold the resources
LEARNER_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)


def run_seed(seed: int, iteration: int, m: int) -> int:
    """The seed of policy m in iteration i: its prompt order and sampling draws (Algorithm 1's runs differ by it)."""
    return (seed * 1_000 + iteration) * 1_000 + m


class LearnerGroup:
    def __init__(self, config: WarpConfig, make_learner: Callable[[int], ray.actor.ActorHandle], log_dir: Path):
        self.config, self.make_learner, self.log_dir = config, make_learner, log_dir
        self.learners = [make_learner(m) for m in range(config.warp.M)]
        self.restarts: list[dict] = []  # what died and was rerun, for the manifest

    def train(self, init: ray.ObjectRef, iteration: int) -> tuple[list[dict], list[list[dict]]]:
        """The M policies trained for T steps from `init`, and their metric histories."""
        runs = {m: self._run(m, init, iteration) for m in range(len(self.learners))}
        results, failures = {}, {m: 0 for m in runs}
        while runs:
            m, refs = next(iter(runs.items()))
            try:
                results[m] = ray.get(list(refs))
                del runs[m]
            except LEARNER_DIED as e:
                failures[m] += 1
                if failures[m] > self.config.resources.learner_retries:
                    raise RuntimeError(f"learner {m} died {failures[m]} times in iteration {iteration}; the last: {e}") from e
                log.warning("learner %d died in iteration %d (%s); rerunning it from the iteration's init", m, iteration, type(e).__name__)
                self.restarts.append({"iteration": iteration, "policy": m, "error": type(e).__name__})
                self.learners[m] = self.make_learner(m)
                runs[m] = self._run(m, init, iteration)
        return [results[m][0] for m in sorted(results)], [results[m][1] for m in sorted(results)]

    def _run(self, m: int, init: ray.ObjectRef, iteration: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        """Queue one RL run on learner m (an actor runs its calls in order): start, T steps, read the policy."""
        learner, log_dir = self.learners[m], self.log_dir / f"iteration_{iteration}" / f"policy_{m}"
        learner.set_weights.remote([init], run_seed(self.config.warp.seed, iteration, m))  # [ref]: passed on, not fetched
        history = learner.run.remote(self.config.warp.T, log_dir, desc=f"iteration {iteration} policy {m}")
        return learner.get_weights.remote(), history
