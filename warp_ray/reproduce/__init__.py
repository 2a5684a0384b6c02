"""`warp-ray reproduce`: the WARP and WARM papers' claims, measured on the built-in task.

runs.py measures (one JSON file), claims.py checks each claim against it, report.py draws the
figures and writes results.md from that JSON alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from warp_ray.config import WarpConfig
from warp_ray.errors import WarpRayError


def reproduce(config: WarpConfig, report_dir: Optional[Path] = None, measure: bool = True) -> Path:
    """Measure (unless `measure` is False: read the last results.json), then write the report;
    returns the path of results.md."""
    from warp_ray.reproduce.report import write_report
    from warp_ray.reproduce.runs import measure as run_all

    results_file = config.paths.output_dir / "reproduce" / "results.json"
    if measure:
        started = time.time()
        results = run_all(config)
        results["wall_seconds"], results["date"] = time.time() - started, time.strftime("%Y-%m-%d")
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
    elif not results_file.is_file():
        raise WarpRayError(f"no results to report: {results_file} does not exist (run warp-ray reproduce without --report-only first)")
    return write_report(json.loads(results_file.read_text()), report_dir or results_file.parent)
