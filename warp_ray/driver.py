"""The drivers of `warp-ray train-rm` and `warp-ray warp`, on the process that submits the work:
find the inputs (the built-in task unless the config names others), check them before Ray
starts, then hand the work to Ray (WARM's Tune trials; WARP's coordinator actor)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from warp_ray.config import WarpConfig
from warp_ray.config_io import check_paths
from warp_ray.coordinator.checkpoints import last_complete
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.coordinator.inputs import check_run_inputs
from warp_ray.data import preference_splits
from warp_ray.errors import WarpRayError
from warp_ray.reward.server import RewardSource
from warp_ray.reward.warm import TRAINED_ON, accuracy_table, is_trained_on, markdown, train_warm, trained_on
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import task_inputs

log = logging.getLogger(__name__)


def run_warm(config: WarpConfig) -> dict[str, dict[str, float]]:
    """`warp-ray train-rm`: WARM on the configured data (the built-in task by default), evaluated."""
    check_paths(config.paths)
    sft, _, preferences, sft_checkpoints = task_inputs(config)
    splits = preference_splits(preferences)
    init_ray()
    out = config.paths.output_dir / "rm"
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAINED_ON).unlink(missing_ok=True)  # until every model is retrained, the folder holds none of a known run
    folders = train_warm(config.warm, sft, splits, out, sft_checkpoints, config.paths.trust_remote_code)
    table = accuracy_table(folders, out / "warm", splits)
    (out / "accuracy.json").write_text(json.dumps(table, indent=2))
    (out / "accuracy.md").write_text(markdown(table))
    (out / TRAINED_ON).write_text(json.dumps(trained_on(config, sft, preferences)))
    return table


def run_warp(config: WarpConfig, resume: bool = False) -> Path:
    """`warp-ray warp`: the inputs (the built-in task unless the config names others; the WARM
    reward model, trained first unless given, already trained on these inputs with these settings,
    or warp.proxy_reward is gold), then Algorithm 1 in the coordinator actor."""
    check_paths(config.paths)
    builtin = config.paths.sft_model is None
    gold = builtin and config.warp.proxy_reward == "gold"
    sft, prompts, preferences, _ = task_inputs(config, preferences=config.paths.reward_model is None and not gold)
    if config.paths.reward_model is not None:
        reward = RewardSource(folders=(str(config.paths.reward_model),))
    elif gold:
        reward = RewardSource(function=world.gold_reward)
    else:
        if not is_trained_on(config, sft, preferences):  # none yet, or trained on another task or with other settings
            run_warm(config)
        reward = RewardSource(folders=(str(config.paths.output_dir / "rm" / "warm"),))
    memory = check_run_inputs(config, sft, prompts, Path(reward.folders[0]) if reward.folders else None)
    log.info("memory of a learner rank, estimated: %s", memory)
    init_ray()
    control = world.gold_reward if builtin else None
    coordinator = ray.remote(num_cpus=0)(Coordinator).remote(config, sft, prompts, reward, control)
    try:
        return ray.get(coordinator.run.remote(resume))
    except RayActorError as e:
        raise WarpRayError(f"the coordinator's process died ({type(e).__name__}); {_resume_hint(config)}") from None
    finally:
        try:
            ray.get(coordinator.close.remote())
        except RayActorError:
            pass  # the coordinator is gone, and its learners with it


def _resume_hint(config: WarpConfig) -> str:
    done = last_complete(config.paths.output_dir)
    where = config.paths.output_dir
    complete = "no iteration was complete" if done is None else f"iterations up to {done} are complete in {where}"
    return complete + ": run the same command with --resume to continue"
