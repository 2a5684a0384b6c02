"""Weights & Biases in its offline mode (`logging.wandb.mode: offline`): the run's files are written
under the output folder with the config, every learner step's metrics and the front; nothing is
sent, and no credential from the environment reaches a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_front import FRONT, RUN
from warp_ray.config import WarpConfig
from warp_ray.coordinator.front import plot_front
from warp_ray.coordinator.wandb_run import WandbRun

SECRET = "wandb-key-that-must-not-be-written-0123456789abcdef"


def test_an_offline_run_writes_the_config_the_metrics_and_the_front_and_no_credential(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a port nothing listens on: offline sends nothing
    config = WarpConfig.from_dict(
        {
            "warp": {"T": 4, "beta": 0.07},
            "logging": {"wandb": {"project": "warp-ray-tests", "mode": "offline", "name": "offline"}},
            "paths": {"output_dir": str(tmp_path)},
        }
    )
    run = WandbRun(config)
    plot_front(FRONT, [RUN, RUN], [0, 2], tmp_path / "front.png", "iteration 1")
    run.log_iteration(1, [0, 2], [RUN, RUN], FRONT, tmp_path / "front.png")  # learner 1 was dropped
    summary, logged_config = dict(run.run.summary), dict(run.run.config)
    run.finish()
    assert summary["policy_2/reward"] == pytest.approx(0.3) and summary["iteration"] == 1
    assert not any(key.startswith("policy_1/") for key in summary)
    assert summary["policy_0/eval_control_reward"] == pytest.approx(-2.2)  # the last step's values
    assert logged_config["warp"]["beta"] == 0.07
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = folder.glob("run-*.wandb")  # the run's log, which `wandb sync` would send
    for logged in (b"policy_0/eval_kl_to_sft", b"front_plot", b'"beta"'):
        assert logged in records.read_bytes()
    assert list((folder / "files" / "media" / "images").glob("front_plot_*.png"))
    assert list((folder / "files" / "media" / "table").glob("front_*.table.json"))
    for path in Path(tmp_path).rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
