"""A rewarded soup's rewards (config `rewards`), as reward servers host them: a reward model
folder, the weight average of several (WARM, averaged here once per soup), or a built-in task
reward by name."""

from __future__ import annotations

from pathlib import Path

from warp_ray.config import WarpConfig
from warp_ray.config_io import check_rewards
from warp_ray.data import prompt_splits, read_prompts
from warp_ray.errors import ConfigError
from warp_ray.merge.folders import average_folders
from warp_ray.reward.server import RewardSource
from warp_ray.task import world


def check_soup_rewards(config: WarpConfig) -> list[Path]:
    """Two or more rewards, each what its kind says (ConfigError naming the first that is not);
    returns the reward model folders, for the checks of the prompts against their contexts."""
    if len(config.rewards) < 2:
        raise ConfigError(
            f"a rewarded soup needs two or more rewards in the config's rewards, got {len(config.rewards)}: "
            "see configs/soup.yaml"
        )
    check_rewards(config)
    for k, spec in enumerate(config.rewards):
        if spec.kind == "builtin" and spec.path not in world.REWARDS:
            raise ConfigError(
                f"rewards.{k}.path = {spec.path!r} is no built-in reward; the built-in task has {list(world.REWARDS)}"
            )
    return [Path(folder) for spec in config.rewards for folder in spec.folders]


def check_text_prompts(config: WarpConfig, prompts: Path) -> None:
    """A built-in reward reads text: refuse prompts given as chat messages before anything starts."""
    if not any(spec.kind == "builtin" for spec in config.rewards):
        return
    for path in prompt_splits(prompts).values():
        for i, prompt in enumerate(read_prompts(path, config.data)):
            if not isinstance(prompt, str):
                raise ConfigError(
                    f"{path}: record {i + 1} is chat messages, which a built-in reward (rewards, kind builtin) does "
                    "not read: give the prompts as text, or use reward models"
                )


def reward_sources(config: WarpConfig, out: Path) -> dict[str, RewardSource]:
    """Each reward by name, as `check_soup_rewards` passed it; a WARM's average written to <out>/<name>."""
    sources = {}
    for spec in config.rewards:
        if spec.kind == "builtin":
            sources[spec.name] = RewardSource(function=world.REWARDS[spec.path])
        elif spec.kind == "model":
            sources[spec.name] = RewardSource(folders=(spec.path,))
        else:
            merged = average_folders(spec.folders, out / spec.name, overwrite=True)
            sources[spec.name] = RewardSource(folders=(str(merged),))
    return sources
