"""bench/scaling.py's figure and its 7B extrapolation, drawn from results of the shape its runs write."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def scaling_bench():
    spec = importlib.util.spec_from_file_location("scaling_bench", ROOT / "bench" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(seconds: float, sync: float) -> dict:
    return {"seconds": seconds, "rollout_seconds": seconds / 2, "update_seconds": seconds / 2, "sync_seconds": sync}


MERGE = {  # MB a model, in memory s, folder to folder s; the largest not last
    "85M": {"megabytes": 400.0, "in_memory_s": 0.5, "folder_to_folder_s": 1.8},
    "0.9M": {"megabytes": 3.5, "in_memory_s": 0.01, "folder_to_folder_s": 1.1},
    "50M": {"megabytes": 200.0, "in_memory_s": 0.2, "folder_to_folder_s": 1.4},
}


def test_a_7b_merge_is_extrapolated_from_the_largest_models():
    in_memory, folders = scaling_bench().seven_b_merge(MERGE)
    assert in_memory == pytest.approx(0.5 * 28_000 / 400)  # the largest model's GB/s
    x, y = [3.5, 200.0, 400.0], [1.1, 1.4, 1.8]  # least squares by hand: slope = cov(x, y) / var(x)
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert folders == pytest.approx(my + slope * (28_000 - mx))


def test_the_figure_draws_each_part_from_a_results_file_as_written(tmp_path):
    bench = scaling_bench()
    results = {
        "iteration": {
            m: {layout: {"train": 4.0 * m, "first_iteration_extra": 10.0 + m} for layout in bench.LAYOUTS}
            for m in (4, 1, 16, 2)  # 16 sorts before 2 as a string
        },
        "step": {
            "0.9M": {"parameters": 9e5, **{layout: step(0.5, 0.02) for layout in bench.STEP_LAYOUTS}},
            "50M": {"parameters": 5e7, **{layout: step(10.0, 0.2) for layout in bench.STEP_LAYOUTS}},
        },
        "merge": MERGE,
    }
    as_measured = bench.plot(results, tmp_path / "measured.png")  # M are ints as measured, strings as read back
    results = json.loads(json.dumps(results))
    figure = bench.plot(results, tmp_path / "scaling.png")
    assert list(as_measured.axes[0].lines[0].get_xdata()) == list(figure.axes[0].lines[0].get_xdata())
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    by_m, step_axes, share, merge = figure.axes
    assert list(by_m.lines[0].get_xdata()) == [1, 2, 4, 16] and list(by_m.lines[0].get_ydata()) == [4, 8, 16, 64]
    assert list(share.lines[0].get_ydata()) == pytest.approx([4.0, 2.0])  # the sync's share of the step, in %
    assert list(share.lines[-1].get_ydata()) == [5.0, 5.0]  # the target
    seven_b = [line.get_ydata()[-1] for line in merge.lines[2::3]]  # each part's extrapolated point
    assert seven_b == pytest.approx(bench.seven_b_merge(MERGE))
    assert [list(line.get_xdata()) for line in merge.lines[1::3]] == [[400.0, 28_000.0]] * 2  # from the largest
    # parts kept from runs that measured fewer layouts: what they hold is drawn
    before_k2 = {
        size: {k: v for k, v in row.items() if k != "colocated, K = 2"} for size, row in results["step"].items()
    }
    engine_actors = {m: {"engine actor": row["engine actor"]} for m, row in results["iteration"].items()}
    older = bench.plot({"step": before_k2, "iteration": engine_actors}, tmp_path / "older.png")
    assert [line.get_label() for line in older.axes[2].lines] == ["engine actor", "colocated", "target"]
    assert len(older.axes[0].lines) == 2  # the engine actor's train lap and its first iteration's extra
