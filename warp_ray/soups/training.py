"""A rewarded soup's RL runs: one policy per reward, and the multi-objective baseline's runs, all
from the SFT, `soup.runs_at_once` at a time.

Each run is a REINFORCE learner of warp.T steps (soup.policy_run reinforce) or a WARP run, the
coordinator's Algorithm 1 (warp). Every run draws the same prompts in the same order (the seed
of WARP's first learner), so runs differ by their reward alone. A run's policy lands in
<runs>/<name>/model (WARP: its last iteration's model), written whole or not at all.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from warp_ray.checkpoint import atomic_dir, save_model
from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import iteration_dir
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.coordinator.learners import run_seed, start_learner
from warp_ray.data import prompt_splits, read_prompts
from warp_ray.errors import TooFewLearners
from warp_ray.learner.learner import bundles, check_finite

log = logging.getLogger(__name__)


class Run(NamedTuple):
    """One RL run: its name (a reward's, or a baseline's lambda) and the reward server it trains against."""

    name: str
    reward: ActorHandle


def train(config: WarpConfig, sft: Path, prompts: Path, runs: list[Run], out: Path) -> dict[str, Path]:
    """Every run, in waves of soup.runs_at_once or as many as the cluster holds; returns each run's
    policy folder by name."""
    at_once = _runs_that_fit(config)
    trained = {}
    for first in range(0, len(runs), at_once):
        wave = runs[first : first + at_once]
        log.info("training %s (%s runs)", ", ".join(run.name for run in wave), config.soup.policy_run)
        for run in wave:
            shutil.rmtree(out / run.name, ignore_errors=True)  # an earlier soup's logs and iterations
        train_wave = _reinforce if config.soup.policy_run == "reinforce" else _warp
        trained.update(train_wave(config, sft, prompts, wave, out))
    return trained


def _runs_that_fit(config: WarpConfig) -> int:
    """soup.runs_at_once, or fewer: as many runs as the cluster's CPUs and GPUs hold at once (a WARP
    run's learners.max learners each), at least one; a wave never waits on resources its own runs hold."""
    learners = config.learner_bounds()[1] if config.soup.policy_run == "warp" else 1
    need = {k: learners * sum(b.get(k, 0) for b in bundles(config)) for k in ("CPU", "GPU")}
    have = ray.cluster_resources()
    fits = min((int(have.get(k, 0) / v + 1e-9) for k, v in need.items() if v), default=config.soup.runs_at_once)
    if fits < config.soup.runs_at_once:
        log.info("the cluster holds %d runs at once of soup.runs_at_once = %d", fits, config.soup.runs_at_once)
    return max(1, min(config.soup.runs_at_once, fits))


def _reinforce(config: WarpConfig, sft: Path, prompts: Path, wave: list[Run], out: Path) -> dict[str, Path]:
    train_prompts = read_prompts(prompt_splits(prompts)["train"], config.data)
    seed = run_seed(config.warp.seed, 0, 0)
    groups = _placement_groups(config, len(wave))
    learners = []
    try:
        learners = [
            start_learner(config, sft, train_prompts, run.reward, seed, group=group) for run, group in zip(wave, groups)
        ]
        ray.get(
            [
                learner.run.remote(config.warp.T, out / run.name / "logs", desc=run.name)
                for run, learner in zip(wave, learners)
            ]
        )
        folders = {}
        for run, learner in zip(wave, learners):
            weights = ray.get(learner.get_weights.remote())
            check_finite(f"the policy of {run.name}", weights)
            with atomic_dir(out / run.name / "model", overwrite=True) as folder:
                save_model([weights], sft, folder)
            folders[run.name] = out / run.name / "model"
        return folders
    finally:
        for learner in learners:
            ray.kill(learner)
        for group in groups:
            remove_placement_group(group)  # and the learner's ranks and engines with it


def _placement_groups(config: WarpConfig, count: int) -> list[PlacementGroup]:
    """A placement group of a learner's bundles for each of `count` learners, all placed within
    learners.scale_up_timeout_s (or place_timeout_s), or none and TooFewLearners: a learner never
    holds part of what it needs while waiting for the rest."""
    groups = [placement_group(bundles(config)) for _ in range(count)]
    timeout = config.learners.scale_up_timeout_s or config.learners.place_timeout_s
    ready, _ = ray.wait([group.ready() for group in groups], num_returns=count, timeout=timeout)
    if len(ready) < count:
        for group in groups:
            remove_placement_group(group)
        raise TooFewLearners(
            f"the cluster placed {len(ready)} of the {count} learners of soup.runs_at_once within {timeout:g} s: each "
            f"takes {bundles(config)} (resources.*) and the cluster has {ray.cluster_resources()}; lower "
            "soup.runs_at_once, ask less per learner, or add nodes"
        )
    return groups


def _warp(config: WarpConfig, sft: Path, prompts: Path, wave: list[Run], out: Path) -> dict[str, Path]:
    configs = [
        config.model_copy(update={"paths": config.paths.model_copy(update={"output_dir": out / run.name})})
        for run in wave
    ]
    # A second thread: a close runs beside a run still going when another run failed. It frees the
    # run's placement groups, which a killed coordinator would leave reserved until this driver ends.
    remote = ray.remote(num_cpus=0, max_concurrency=2)(Coordinator)
    coordinators = [
        remote.remote(run_config, sft, prompts, run.reward, name=f"soup-{run.name}")
        for run, run_config in zip(wave, configs)
    ]
    failed = True
    try:
        ray.get([coordinator.run.remote() for coordinator in coordinators])
        failed = False
    finally:
        for coordinator in coordinators:
            try:
                ray.get(coordinator.close.remote(failed), timeout=60)
            except (RayActorError, GetTimeoutError):
                pass  # gone, and its learners with it
            ray.kill(coordinator)
    return {run.name: iteration_dir(out / run.name, config.warp.I - 1) / "model" for run in wave}
