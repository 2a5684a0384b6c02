"""Benchmark of warp_ray.merge on a GPT-2 124M (random weights, float32, ~500 MB a model).

1. In memory: SLERP of M = 2 and M = 4 state dicts, in GB/s (bytes read + written), against
   a plain tensor copy (`clone`) of the same tensors measured in the same run.
2. Folder to folder: `warp-ray merge slerp` of init + 2 models, wall time and peak RSS,
   against `cp -r` of the three input folders and mergekit's `nuslerp` (task-vector SLERP
   relative to a base model) on the same folders. Each command runs in its own process;
   peak RSS is that process's maximum resident set (os.wait4).

Run: make bench (installs mergekit, a benchmark-only dependency), or .venv/bin/python bench/merge.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from warp_ray.merge import slerp

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


def make_models(folder: Path, count: int) -> list[Path]:
    """An init and `count` models moved from it by random task vectors, as HF folders."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder / "init")
    init = load_file(folder / "init" / "model.safetensors")
    paths = [folder / "init"]
    for m in range(count):
        path = folder / f"model_{m + 1}"
        path.mkdir()
        shutil.copy(folder / "init" / "config.json", path)
        save_file(
            {k: v + 1e-3 * torch.randn_like(v) for k, v in init.items()}, path / "model.safetensors", {"format": "pt"}
        )
        paths.append(path)
    return paths


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def in_memory(paths: list[Path], rounds: int) -> dict:
    """Best of `rounds` interleaved runs of each: the allocator's state (fresh pages or reused
    ones) swings a copy between about 5 and 12 GB/s here, and interleaving exposes every
    operation to the same states."""
    sds = [{k: v.clone() for k, v in load_file(p / "model.safetensors").items()} for p in paths]
    size = sum(v.numel() * v.element_size() for v in sds[0].values())
    operations = {"copy": (2, lambda: [v.clone() for v in sds[0].values()])}
    for M in (2, 4):
        operations[f"slerp_M{M}"] = (M + 2, lambda M=M: slerp(sds[0], sds[1 : M + 1]))
    seconds = {name: [] for name in operations}
    for _ in range(rounds):
        for name, (_, run) in operations.items():
            seconds[name].append(best_time(run, repeats=1))
    result = {"model_bytes": size}
    for name, (models_moved, _) in operations.items():
        result[f"{name}_seconds"] = min(seconds[name])
        result[f"{name}_GBps"] = models_moved * size / min(seconds[name]) / 1e9
        result[f"{name}_vs_copy"] = result[f"{name}_GBps"] / (2 * size / min(seconds["copy"]) / 1e9)
    return result


# A child's peak RSS counts what it inherited at fork, so commands are forked from this small
# launcher rather than from the benchmark process, which holds gigabytes of models.
LAUNCHER = """import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{os.waitstatus_to_exitcode(status)} {time.perf_counter() - start} {usage.ru_maxrss}")
"""


def measured(command: list[str], env: dict, work: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command in its own process."""
    report = work / "measured.txt"
    result = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, str(report), *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    code, seconds, max_rss_kb = report.read_text().split()
    if result.returncode != 0 or code != "0":
        raise RuntimeError(f"{command[0]} failed: {result.stderr.decode()[-2000:]}")
    return float(seconds), int(max_rss_kb) / 1024


def folder_to_folder(paths: list[Path], work: Path, repeats: int) -> dict:
    init, a, b = paths[:3]
    config = work / "mergekit.yml"
    config.write_text(
        f"merge_method: nuslerp\nbase_model: {init}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: "
        "float32\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    commands = {
        "cp -r (3 input folders)": lambda out: ["cp", "-r", str(init), str(a), str(b), str(out)],
        "warp-ray merge slerp": lambda out: [
            sys.executable,
            "-m",
            "warp_ray.cli",
            "merge",
            "slerp",
            "--init",
            str(init),
            "--models",
            str(a),
            str(b),
            "--out",
            str(out),
        ],
        "mergekit nuslerp": lambda out: [str(MERGEKIT), str(config), str(out), "--quiet", "--no-write-model-card"],
        "python + torch import only": lambda out: [sys.executable, "-c", "import warp_ray.merge.folders"],
    }
    rows = {}
    for name, command in commands.items():
        runs = []
        for r in range(repeats):
            out = work / f"out_{len(rows)}_{r}"
            if name.startswith("cp"):
                out.mkdir()
            runs.append(measured(command(out), env, work))
        rows[name] = {"seconds": min(s for s, _ in runs), "peak_rss_MB": max(m for _, m in runs)}
    ours = load_file(work / "out_1_0" / "model.safetensors")
    theirs = load_file(next((work / "out_2_0").glob("*.safetensors")))
    rows["max_abs_diff_warp_ray_vs_mergekit"] = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each folder-to-folder command (best time)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the in-memory merges (best time)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "merge.json")
    args = parser.parse_args()
    if not MERGEKIT.exists():
        sys.exit("mergekit is not installed: run `make bench`, which installs the bench extra")
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        work = Path(tmp)
        print("writing an init and 4 models (GPT-2 124M, float32) ...", flush=True)
        paths = make_models(work, 4)
        memory = in_memory(paths, args.rounds)
        folders = folder_to_folder(paths, work, args.repeats)
    model_mb = memory["model_bytes"] / 1e6
    results = {"torch_threads": torch.get_num_threads(), "in_memory": memory, "folder_to_folder": folders}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    print(f"\nIn memory, one model = {model_mb:.0f} MB (float32), {torch.get_num_threads()} threads\n")
    print("| operation | GB/s (read + written) | vs copy |\n|---|---|---|")
    print(f"| tensor copy (clone) | {memory['copy_GBps']:.2f} | 1.00 |")
    for M in (2, 4):
        print(f"| slerp M = {M} | {memory[f'slerp_M{M}_GBps']:.2f} | {memory[f'slerp_M{M}_vs_copy']:.2f} |")
    print(f"\nFolder to folder, M = 2 (init + 2 models of {model_mb:.0f} MB each)\n")
    print("| command | wall s | peak RSS MB | peak RSS / one model |\n|---|---|---|---|")
    for name, row in folders.items():
        if isinstance(row, dict):
            print(f"| {name} | {row['seconds']:.2f} | {row['peak_rss_MB']:.0f} | {row['peak_rss_MB'] / model_mb:.2f} |")
    print(f"\nmax |warp-ray - mergekit| over all weights: {folders['max_abs_diff_warp_ray_vs_mergekit']:.2e}")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
