"""`warp-ray reproduce`: the WARP and WARM papers' claims, measured on the built-in task.

regime.py first checks that the task behaves like RLHF as the papers ran it (criteria fixed in
advance), runs.py measures (one JSON file), claims.py checks each claim against it, report.py
draws the figures and writes results.md from that JSON alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from warp_ray.checkpoint import write_atomic
from warp_ray.config import WarpConfig
from warp_ray.config_io import check_paths
from warp_ray.errors import ConfigError, WarpRayError
from warp_ray.task import world

REGIME_LOG = Path("results") / "regime_runs.jsonl"
"""Every regime measured, one JSON line each, under the report's folder: the configurations tried."""


def reproduce(
    config: WarpConfig, report_dir: Optional[Path] = None, measure: bool = True, seeds: Optional[int] = None
) -> Path:
    """Measure (unless `measure` is False: read the last results.json), then write the report;
    returns the path of results.md. `seeds`: measure the first ones of reproduce.seeds only."""
    from warp_ray.reproduce.report import write_report
    from warp_ray.reproduce.runs import measure as run_all

    check_paths(config.paths)
    if seeds is not None:
        listed = config.reproduce.seeds
        if not 1 <= seeds <= len(listed):
            raise ConfigError(
                f"--seeds {seeds}: reproduce.seeds lists {len(listed)} ({listed}); take 1 to {len(listed)} of them"
            )
        config = config.model_copy(update={"reproduce": config.reproduce.model_copy(update={"seeds": listed[:seeds]})})
    results_file = config.paths.output_dir / "reproduce" / "results.json"
    folder = report_dir or results_file.parent
    if measure:
        results = run_all(config)
        results["date"] = time.strftime("%Y-%m-%d")
        results_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(results_file, json.dumps(results, indent=1))  # the last good results stay until these are whole
        _log_regime(folder, config, results["by_seed"][0]["regime"])
    elif not results_file.is_file():
        raise WarpRayError(
            f"no results to report: {results_file} does not exist (run warp-ray reproduce without --report-only first)"
        )
    results = json.loads(results_file.read_text())
    if "by_seed" not in results:
        raise WarpRayError(
            f"{results_file} was measured before the reproduction ran over seeds (it has no by_seed): "
            "measure again (warp-ray reproduce without --report-only)"
        )
    log = folder / REGIME_LOG
    tried = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return write_report(results, folder, tried)


def measure_regime(config: WarpConfig, report_dir: Optional[Path] = None) -> tuple[str, Path]:
    """`warp-ray reproduce --regime-only`: the regime alone (on the first seed), appended to the log of configurations
    tried (in `report_dir`, default <output_dir>/reproduce); returns its table and the log's path."""
    from warp_ray.reproduce import regime
    from warp_ray.reproduce.runs import check_protocol
    from warp_ray.reproduce.runs import measure_regime as run_regime

    check_paths(config.paths)
    check_protocol(config)
    measured = run_regime(
        config.model_copy(update={"warp": config.warp.model_copy(update={"seed": config.reproduce.seeds[0]})})
    )
    folder = report_dir or config.paths.output_dir / "reproduce"
    _log_regime(folder, config, measured)
    return regime.markdown(measured), folder / REGIME_LOG


def _log_regime(folder: Path, config: WarpConfig, measured: dict) -> None:
    log = folder / REGIME_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "date": time.strftime("%Y-%m-%d"),
        "world": world.FINGERPRINT,  # the built-in task's prompts and gold reward, which no config setting names
        "config": config.model_dump(mode="json"),
        "regime": measured,
    }

    logged = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    # a seed read back, or a quick run then a full one, logs it once
    if not any(_same_measure(e, entry) for e in logged):
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _same_measure(a: dict, b: dict) -> bool:
    """Two log entries of the same measure: the same world, settings and numbers (where the run's
    folder was, and which seeds it listed, aside)."""

    def settings(entry: dict) -> dict:
        return {k: v for k, v in entry["config"].items() if k not in ("reproduce", "paths")}

    return a.get("world") == b["world"] and settings(a) == settings(b) and a["regime"] == b["regime"]
