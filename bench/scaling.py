"""How cost grows, every figure against the smallest setting of the same run.

1. A WARP iteration against M (1, 2, 4 learners on this one machine, each learner a quarter of
   its 2 CPUs whatever M is), its learners' engines actors of their own or colocated:
   `Coordinator.run` with I = 2; iteration 1's laps (train, merge, front) and iteration 0's train
   lap minus iteration 1's: what the first iteration adds (the learners' processes and imports,
   the engines' and ranks' first calls).
2. A learner's step against policy size: GPT-2s of random weights of about 0.9M (the built-in
   SFT's shape), 10M and 50M parameters, with the built-in tokenizer and prompts, one learner
   (ZeRO-2, fp32, gold reward, started as runs start it: an actor) in three layouts: one rank, its
   engine an actor of its own (core in process, weights through the object store) or colocated in
   its rank's process (configs/tiny.yaml's), and two ranks each hosting its engine; medians of its
   steps split into rollout, update and sync. Random weights rarely stop: nearly every completion
   runs to the length limit, the most work a step can hold.
3. Merge time against model size: `warp_ray.merge.slerp` of M = 2 in memory, and
   `warp-ray merge slerp` folder to folder (its process's start included), both on one torch
   thread, on the same three sizes and GPT-2 124M's layers (85M parameters with the built-in
   vocabulary), the init and two models each of its own random draw; GB/s of bytes read and
   written.

The figure (`--plot`, bench/out/scaling.png by default) draws the three from the results file, the
parts not measured in this run as an earlier run left them: the iteration's train lap against M, the
step and its sync's share against size (the 5% target marked), and the merge against size with a
7B model's float32 weights (28 GB) extrapolated: in memory at the largest model's GB/s (the merge is
bandwidth-bound from about 50M on), folder to folder along the least-squares line through every size
(a fixed start, then a cost per MB).

Run: .venv/bin/python bench/scaling.py [--parts step ...]   (builds a small built-in task under bench/out/ once)
     .venv/bin/python bench/scaling.py --plot-only [--plot docs/scaling.png]   (redraws from --out)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import ray
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from warp_ray.checkpoint import load_model_weights
from warp_ray.config import TaskParams, WarpConfig
from warp_ray.config_io import load_config
from warp_ray.coordinator.coordinator import Coordinator
from warp_ray.coordinator.learners import start_learner
from warp_ray.data import read_prompts
from warp_ray.merge import slerp
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import build_task

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TINY = ROOT / "configs" / "tiny.yaml"
ENGINE_ACTOR = ["resources.colocate=false", "resources.rollout_in_process=true", "resources.weight_sync=object_store"]
"""Each engine an actor of its own, its core in process (configs/tiny.yaml's layout until 2026-12-01)."""
LAYOUTS = {"engine actor": ENGINE_ACTOR, "colocated": []}
"""The learners' layouts measured against M and against size: configs/tiny.yaml's own is colocated."""
STEP_LAYOUTS = {
    **LAYOUTS,
    "colocated, K = 2": ["resources.ranks_per_learner=2", "resources.rollout_workers_per_learner=2"],
}
"""Against size, also a learner of two ranks each hosting its engine (the tiny config's CPUs for each)."""
SHAPES = {  # name: (n_embd, n_layer, n_head); the built-in SFT is 128 wide, 4 deep
    "0.9M": (128, 4, 4),
    "10M": (384, 6, 6),
    "50M": (768, 7, 12),
}
PARTS = ("merge", "step", "iteration")
GPT2_124M_BODY = (768, 12, 12)
"""GPT-2 124M's layers; with the built-in tokenizer's small vocabulary, 85M parameters."""
SEVEN_B_MEGABYTES = 7e9 * 4 / 1e6
"""A 7B model's weights in float32, as the merges read them, in MB."""
ITERATION_STEPS = 10
"""T of each iteration measured against M."""
SYNC_TARGET = 0.05
"""The sync's share of a step that the learner aims under."""


SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
"""What a random policy's folder built before must match to be reused."""


def random_policy(
    task: Path, shape: tuple[int, int, int], folder: Path, seed: int = 0, vocab_size: int | None = None
) -> tuple[Path, int]:
    """A GPT-2 of random weights of `shape` drawn from `seed`, with the built-in task's tokenizer and
    context (and the tokenizer's vocabulary, or `vocab_size` rows of embedding); its size. A folder
    already built is reused if its model has that shape and vocabulary (the folder names the seed)."""
    base = GPT2Config.from_pretrained(task / "sft")
    n_embd, n_layer, n_head = shape
    config = GPT2Config(
        **{
            **base.to_dict(),
            "n_embd": n_embd,
            "n_layer": n_layer,
            "n_head": n_head,
            "vocab_size": vocab_size or base.vocab_size,
        }
    )
    built = GPT2Config.from_pretrained(folder) if (folder / "model.safetensors").is_file() else None
    if built is None or any(getattr(built, key) != getattr(config, key) for key in SHAPE_KEYS):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(task / "sft").save_pretrained(folder)
    return folder, sum(t.numel() for t in load_model_weights(folder).values())


def iteration_against_m(task: Path, counts: list[int]) -> dict:
    """Each M in each of LAYOUTS."""
    rows = {}
    quarters = ["resources.cpus_per_rank=0.25", "resources.cpus_per_rollout_worker=0.25"]
    for M in counts:
        rows[M] = {}
        sizes = [
            f"warp.M={M}",
            "warp.I=2",
            f"warp.T={ITERATION_STEPS}",
            "evaluation.every=0",
            "evaluation.front_etas=[0,0.5,1]",
        ]
        for layout, overrides in LAYOUTS.items():
            with tempfile.TemporaryDirectory(prefix=f"scaling_m{M}_", dir=OUT) as out:
                run = load_config(TINY, [*overrides, *sizes, *quarters, f"paths.output_dir={out}"])
                gold = RewardSource(function=world.gold_reward)
                coordinator = Coordinator(run, task / "sft", task / "prompts", gold)
                try:
                    coordinator.run()
                finally:
                    coordinator.close()
                manifests = [Path(out, f"iteration_{i}", "manifest.json") for i in (0, 1)]
                laps = [json.loads(manifest.read_text())["seconds"] for manifest in manifests]
            rows[M][layout] = {**laps[1], "first_iteration_extra": laps[0]["train"] - laps[1]["train"]}
            print(f"M = {M}, {layout}: {rows[M][layout]}", flush=True)
    return rows


def step_against_size(task: Path, steps: int) -> dict:
    """Each size in each of STEP_LAYOUTS, a learner started as runs start it (an actor)."""
    rows = {}
    prompts = read_prompts(task / "prompts" / "train.jsonl")
    for name, shape in SHAPES.items():
        folder, parameters = random_policy(task, shape, OUT / "scaling_models" / name)
        rows[name] = {"parameters": parameters}
        for layout, overrides in STEP_LAYOUTS.items():
            reward_server = RewardServer.remote(RewardSource(function=world.gold_reward))
            learner = start_learner(load_config(TINY, overrides), folder, prompts, reward_server, 0)
            ray.get(learner.run.remote(3, desc=f"warm-up ({name}, {layout})"))
            history = ray.get(learner.run.remote(steps, desc=f"{name}, {layout}"))
            ray.kill(learner)  # and the engine actor it started, which shares its fate
            ray.kill(reward_server)
            keys = ("seconds", "rollout_seconds", "update_seconds", "sync_seconds", "truncated")
            rows[name][layout] = {k: statistics.median(h[k] for h in history) for k in keys}
            print(f"{name}, {layout}: {rows[name][layout]}", flush=True)
    return rows


def merge_against_size(task: Path) -> dict:
    rows = {}
    for name, shape in {**SHAPES, "85M": GPT2_124M_BODY}.items():
        folders = [random_policy(task, shape, OUT / "scaling_models" / f"{name}_{k}", seed=k)[0] for k in range(3)]
        weights = [load_model_weights(f) for f in folders]
        nbytes = sum(t.numel() * t.element_size() for t in weights[0].values())
        start = time.perf_counter()
        slerp(weights[0], weights[1:])
        in_memory = time.perf_counter() - start
        with tempfile.TemporaryDirectory(dir=OUT) as work:
            start = time.perf_counter()
            command = [sys.executable, "-m", "warp_ray.cli", "merge", "slerp", "--init", str(folders[0])]
            command += ["--models", *map(str, folders[1:]), "--out", f"{work}/merged"]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as here
            folder_to_folder = time.perf_counter() - start
        moved = 4 * nbytes  # the init and 2 models read, one written: M + 2 model-sizes, as bench/merge.py counts
        rows[name] = {
            "megabytes": nbytes / 1e6,
            "in_memory_s": in_memory,
            "in_memory_gb_s": moved / in_memory / 1e9,
            "folder_to_folder_s": folder_to_folder,
        }
        print(f"{name}: {rows[name]}", flush=True)
    return rows


def seven_b_merge(rows: dict) -> tuple[float, float]:
    """(in memory s, folder to folder s) of a 7B merge, extrapolated from `merge_against_size`'s rows:
    the largest model's GB/s, and the least-squares line of the folder-to-folder times against MB (a
    fixed start, then a cost per MB)."""
    largest = max(rows.values(), key=lambda r: r["megabytes"])
    in_memory = largest["in_memory_s"] * SEVEN_B_MEGABYTES / largest["megabytes"]
    line = statistics.linear_regression(
        [r["megabytes"] for r in rows.values()], [r["folder_to_folder_s"] for r in rows.values()]
    )
    return in_memory, line.intercept + line.slope * SEVEN_B_MEGABYTES


def measured(layouts: dict, rows: list[dict]) -> list[str]:
    """The layouts every row holds: a results file keeps the parts an earlier run measured, which may
    predate a layout."""
    return [layout for layout in layouts if all(layout in row for row in rows)]


def plot(results: dict, path: Path) -> plt.Figure:
    """The figure of the module's docstring, from a results file's parts (any it lacks are left blank),
    saved at `path`."""
    figure, ((by_m, step), (share, merge)) = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    colours = dict(zip(STEP_LAYOUTS, ("tab:orange", "tab:blue", "tab:green")))
    if "iteration" in results:
        counts = sorted(results["iteration"], key=int)
        xs = [int(m) for m in counts]
        for layout in measured(LAYOUTS, [results["iteration"][m] for m in counts]):
            rows = [results["iteration"][m][layout] for m in counts]
            by_m.plot(
                xs,
                [r["train"] for r in rows],
                "o-",
                color=colours[layout],
                label=f"{layout}: train, {ITERATION_STEPS} steps",
            )
            extra = [r["first_iteration_extra"] for r in rows]
            by_m.plot(xs, extra, "s--", color=colours[layout], label=f"{layout}: the first iteration's extra")
        by_m.set(xlabel="learners M (2 CPUs)", ylabel="seconds", xticks=xs, title="A WARP iteration against M")
        by_m.legend(fontsize=8)
    if "step" in results:
        sizes = list(results["step"].values())
        parameters = [s["parameters"] for s in sizes]
        for layout in measured(STEP_LAYOUTS, sizes):
            rows = [s[layout] for s in sizes]
            for key, style, part in (("seconds", "o-", "step"), ("sync_seconds", "v:", "sync")):
                step.plot(parameters, [r[key] for r in rows], style, color=colours[layout], label=f"{layout}: {part}")
            shares = [100 * r["sync_seconds"] / r["seconds"] for r in rows]
            share.plot(parameters, shares, "o-", color=colours[layout], label=layout)
        share.axhline(100 * SYNC_TARGET, color="grey", linestyle="--", label="target")
        step.set(xscale="log", yscale="log", xlabel="policy parameters", ylabel="seconds (median)")
        step.set_title("A learner's step against size")
        share.set(xscale="log", xlabel="policy parameters", ylabel="% of the step", ylim=(0, None))
        share.set_title("The sync's share of a step")
        step.legend(fontsize=8)
        share.legend(fontsize=8)
    if "merge" in results:
        rows = sorted(results["merge"].values(), key=lambda r: r["megabytes"])
        megabytes = [r["megabytes"] for r in rows]
        in_memory, folder = seven_b_merge(results["merge"])
        for key, seven_b, label in (("in_memory_s", in_memory, "in memory"), ("folder_to_folder_s", folder, "folders")):
            (line,) = merge.plot(megabytes, [r[key] for r in rows], "o-", label=f"SLERP M = 2, {label}")
            merge.plot([megabytes[-1], SEVEN_B_MEGABYTES], [rows[-1][key], seven_b], "--", color=line.get_color())
            merge.plot([SEVEN_B_MEGABYTES], [seven_b], "o", mfc="none", color=line.get_color())
        merge.annotate("7B, extrapolated", (SEVEN_B_MEGABYTES, in_memory), ha="right", va="top", fontsize=8)
        merge.set(xscale="log", yscale="log", xlabel="MB a model (float32)", ylabel="seconds, one thread")
        merge.set_title("Merge against size")
        merge.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return figure


def task_folder(config: WarpConfig) -> Path:
    """A small built-in task (the test suite's sizes, the config's length limit), built once."""
    small = TaskParams(corpus_size=2000, sft_steps=100, pairs=600, validation_pairs=300, ood_pairs=300)
    return build_task(small, OUT / "scaling_task", config.warp.max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps of each policy size in each layout")
    parser.add_argument("--learners", type=int, nargs="+", default=[1, 2, 4], help="the values of M")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which of the three to measure")
    parser.add_argument("--out", type=Path, default=OUT / "scaling.json")
    parser.add_argument("--plot", type=Path, default=OUT / "scaling.png", help="the figure, drawn from --out")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out, measuring nothing")
    args = parser.parse_args()
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}  # kept: the parts not measured this time
    if args.plot_only:
        if not any(part in earlier for part in PARTS):
            parser.error(f"--plot-only draws from --out, and {args.out} holds no results: run the benchmark first")
        plot(earlier, args.plot)
        return
    task = task_folder(load_config(TINY))
    torch.set_num_threads(1)
    init_ray(num_cpus=2)
    try:
        measure = {
            "merge": lambda: merge_against_size(task),
            "step": lambda: step_against_size(task, args.steps),
            "iteration": lambda: iteration_against_m(task, args.learners),
        }
        results = {part: measure[part]() for part in args.parts}
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(earlier | results, indent=2))
    plot(earlier | results, args.plot)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
