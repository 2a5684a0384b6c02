"""The `warp-ray` command as a user runs it: a subprocess, real folders, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def warp_ray(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warp_ray.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_merge_help_explains_each_method():
    result = warp_ray("merge", "--help")
    assert result.returncode == 0
    for method in ("slerp", "average", "liti", "soup"):
        assert f"warp-ray merge {method}" in result.stdout


def test_merge_slerp_then_liti_from_the_command_line(model_folders, tmp_path):
    merged, front = tmp_path / "merged", tmp_path / "front"
    result = warp_ray(
        "merge",
        "slerp",
        "--init",
        model_folders["init"],
        "--models",
        model_folders["a"],
        model_folders["b"],
        "--weights",
        "0.3",
        "0.7",
        "--out",
        merged,
    )
    assert result.returncode == 0, result.stderr
    result = warp_ray(
        "merge", "liti", "--init", model_folders["init"], "--merged", merged, "--eta", "0.5", "--out", front
    )
    assert result.returncode == 0, result.stderr
    init, out = (AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (model_folders["init"], front))
    moved = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(out[key], 0.5 * init[key] + 0.5 * moved[key], atol=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["merge", "liti", "--init", "{init}", "--merged", "{a}", "--eta", "1.2", "--out", "{tmp}/o"],
            "eta = 1.2 is outside the allowed range [0, 1]",
        ),
        (
            ["merge", "slerp", "--init", "{init}", "--models", "{a}", "{tmp}/nope", "--out", "{tmp}/o"],
            "model folder {tmp}/nope does not exist",
        ),
        (
            ["merge", "average", "--models", "{a}", "{b}", "--weights", "1", "--out", "{tmp}/o"],
            "got 1 weights for 2 models",
        ),
        (
            ["config", "--set", "warp.mu=3"],
            "warp.mu = 3: Input should be less than or equal to 1 (allowed range: [0, 1])",
        ),
        (["config", "--config", "{tmp}/missing.yaml"], "cannot read config {tmp}/missing.yaml"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(model_folders, tmp_path, args, message):
    fill = {"init": model_folders["init"], "a": model_folders["a"], "b": model_folders["b"], "tmp": tmp_path}
    result = warp_ray(*(a.format(**fill) for a in args))
    assert result.returncode == 2
    assert message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_config_prints_the_resolved_config():
    result = warp_ray("config", "--config", "configs/tiny.yaml", "--set", "warp.beta=0.02")
    assert result.returncode == 0, result.stderr
    assert "beta: 0.02" in result.stdout and "mu: 0.01" in result.stdout
