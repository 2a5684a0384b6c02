"""The config's I/O, which config.py leaves out: reading its YAML file (`load_config`), and
checking the folders it names before anything starts (`check_paths`). Every entry point runs
`check_paths` first: `warp-ray config`, and the drivers of `train-rm`, `warp`, `soup` and `reproduce`;
`soup` runs `check_rewards` too."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from warp_ray.checkpoint import model_config, weight_layout
from warp_ray.config import Paths, WarpConfig
from warp_ray.data import preference_splits, prompt_splits
from warp_ray.errors import ConfigError, WarpRayError


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> WarpConfig:
    """The config in a YAML file (the defaults when path is None), with `section.key=value` overrides."""
    try:
        text = Path(path).read_text() if path is not None else ""
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return WarpConfig.from_yaml(text, overrides, source=str(path) if path is not None else None)


def check_paths(paths: Paths) -> None:
    """The folders paths.* names: model folders are Hugging Face folders that ship no code of
    their own unless paths.trust_remote_code; data folders have a train split. One error lists
    every problem, each under its key."""
    problems = [problem for key, folder, check in _checks(paths) if (problem := _problem(key, folder, check))]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def check_rewards(config: WarpConfig) -> None:
    """The reward model folders that `rewards` names (`warp-ray soup`), as `check_paths` checks
    paths.*, their weight files' headers too: one error lists every problem, each under its key."""
    model = _model_check(config.paths.trust_remote_code)

    def reward_model(folder: Path) -> None:
        model(folder)
        weight_layout(folder)  # safetensors, whole

    problems = [
        problem
        for k, spec in enumerate(config.rewards)
        for j, folder in enumerate(spec.folders)
        if (
            problem := _problem(
                f"rewards.{k}.path" + (f".{j}" if spec.kind == "warm" else ""), Path(folder), reward_model
            )
        )
    ]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def _model_check(trust_remote_code: bool) -> Callable[[Path], None]:
    def model(folder: Path) -> None:
        if "auto_map" in model_config(folder) and not trust_remote_code:
            raise ConfigError(
                "it ships its own model code (auto_map in its config.json), which warp-ray does not run "
                "unless paths.trust_remote_code is true"
            )

    return model


def _checks(paths: Paths) -> Iterator[tuple[str, Path, Callable[[Path], None]]]:
    model = _model_check(paths.trust_remote_code)
    if paths.sft_model is not None:
        yield "paths.sft_model", paths.sft_model, model
    for k, folder in enumerate(paths.sft_checkpoints):
        yield f"paths.sft_checkpoints.{k}", folder, model
    if paths.reward_model is not None:
        yield "paths.reward_model", paths.reward_model, model
    if paths.prompts is not None:
        yield "paths.prompts", paths.prompts, prompt_splits
    if paths.preferences is not None:
        yield "paths.preferences", paths.preferences, preference_splits


def _problem(key: str, folder: Path, check: Callable[[Path], None]) -> Optional[str]:
    try:
        check(folder)
    except WarpRayError as e:
        return f"{key} = {str(folder)!r}: {e}"
    return None
