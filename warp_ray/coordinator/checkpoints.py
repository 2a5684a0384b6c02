"""Iteration checkpoints: <output_dir>/iteration_<i>/ holds the next init as a Hugging Face folder
(model/), the LITI front (front.json, front.png), the learners' metrics (trajectories.json) and a
manifest (config, iteration, seeds, timings). Each is written under a temporary name and renamed
when complete, so a folder of that name is a complete iteration, and resuming starts after the
last one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from torch import Tensor

from warp_ray.checkpoint import atomic_dir, save_model
from warp_ray.config import WarpConfig
from warp_ray.errors import ConfigError

MANIFEST = "manifest.json"


def iteration_dir(out: Path, iteration: int) -> Path:
    return out / f"iteration_{iteration}"


def save_iteration(
    out: Path,
    iteration: int,
    init: Iterable[Mapping[str, Tensor]],
    shards: int,
    like: Path,
    manifest: dict,
    extras: Callable[[Path], None],
) -> Path:
    """The next init (its `shards` dicts, one at a time) and the manifest, plus what `extras(folder)`
    writes there, atomically."""
    with atomic_dir(iteration_dir(out, iteration), overwrite=True) as tmp:
        (tmp / "model").mkdir()
        save_model(init, like, tmp / "model", shards)
        extras(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return iteration_dir(out, iteration)


def last_complete(out: Path) -> Optional[int]:
    names = [re.fullmatch(r"iteration_(\d+)", p.name) for p in out.glob("iteration_*") if (p / MANIFEST).is_file()]
    return max((int(m.group(1)) for m in names if m), default=None)


def resume_from(out: Path, iteration: int, config: WarpConfig) -> Path:
    """The model folder of the init that iteration `iteration` wrote, after checking that the run's settings are the
    same (only the number of iterations may grow): another config would not continue this run."""
    folder = iteration_dir(out, iteration)
    saved = json.loads((folder / MANIFEST).read_text())["config"]["warp"]
    current = config.model_dump(mode="json")["warp"]
    changed = [k for k in current if k != "I" and saved.get(k) != current[k]]
    if changed:
        raise ConfigError(
            f"cannot resume {out}: warp.{changed[0]} was {saved.get(changed[0])!r} in that run and is now "
            f"{current[changed[0]]!r} ({len(changed)} setting(s) differ; only warp.I may change on resume)"
        )
    return folder / "model"
