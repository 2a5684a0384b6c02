"""bench/gpu_check.sh, the prepared GPU check, in its dry run: the same code at tiny sizes on the CPU,
where the device machine's Python has no Ray, vLLM, DeepSpeed or pydantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_DEVICE = ("ray", "vllm", "deepspeed", "pydantic")


def test_the_gpu_check_dry_run_passes_with_only_torch_and_transformers(tmp_path):
    # A sitecustomize that makes the device machine's missing packages unimportable in the child.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_THE_DEVICE)
    )
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path), "OUT": str(tmp_path)}
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError" in blocked.stderr  # the child cannot import Ray
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failures"] == [] and result["device"] == "cpu (dry run)"
    assert result["policy_moved"] and result["anchor_moved"] and result["greedy_tokens"] == [8, 8]
    assert result["logprob_max_difference"] < 1e-5 and result["weights_copied_to_cpu_float32"]
    speed, merges = result["speed"], result["merges"]
    assert speed["ema_seconds"] > 0 and 0 < speed["step_seconds_without_ema"] <= speed["step_seconds_with_ema"]
    assert speed["forward_tokens_per_s"] > speed["forward_backward_tokens_per_s"] > 0
    for model, timed in result["anchor_forward"].items():  # the anchor in bf16 and in float32, each model
        assert timed["parameters"] > 0 and timed["anchor_forward_float32_over_bf16"] > 0, model
        assert timed["forward_backward_bf16_seconds"] > 0 < timed["forward_backward_float32_seconds"], model
    assert set(result["anchor_forward"]) == {"check_model", "llama_2_7b_layers"}
    for name in ("slerp_m2", "slerp_m4", "liti"):  # bf16 merges against float64, and where they were computed
        assert 0 < merges[name]["relative_error"] < 2**-7 and merges[name]["equal_when_rounded"] >= 0.99, name
        assert merges[name]["on_the_device_in_bf16"] and merges[name]["gb_per_s"] > 0 < merges[name]["of_copy"], name
    # the accuracy check tells SLERP from the linear merge of the same task vectors
    assert merges["linear_m2_against_slerp"]["relative_error"] > 2**-7
