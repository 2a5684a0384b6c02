"""One short REINFORCE run on the built-in task of configs/tiny.yaml: a learner (EMA anchor) against
WARM, evaluated on held-out prompts with the gold reward as the control, as the run reports it.

It uses only what every revision since the reproduction landed (c5aee80) has, so the same file
measures a run before and after a change: docs/results.md's "Defects: before and after" ran it
on the revision before the fixes (its own tiny.yaml) and after them.

Run: .venv/bin/python bench/short_run.py --out bench/out/short_run.json   (task and WARM built once)
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from warp_ray.config_io import load_config
from warp_ray.data import read_prompts
from warp_ray.driver import run_warm
from warp_ray.evaluation import Evaluator, ReferencePolicy
from warp_ray.learner.learner import Learner
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import task_inputs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "short_run.json")
    args = parser.parse_args()
    output_dir = ROOT / "bench" / "out" / "short_run"
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"paths.output_dir={output_dir}", "evaluation.every=20", "evaluation.samples_per_prompt=16"],
    )
    sft, prompts, _, _ = task_inputs(config)
    init_ray(num_cpus=2)
    warm = output_dir / "rm" / "warm"
    if not warm.is_dir():
        run_warm(config)
    proxy, gold = (
        RewardServer.remote(RewardSource(folders=(str(warm),))),
        RewardServer.remote(RewardSource(function=world.gold_reward)),
    )
    evaluator = Evaluator(
        config, read_prompts(prompts / "held_out.jsonl"), proxy, ReferencePolicy.remote(str(sft)), control_server=gold
    )
    learner = Learner(config, sft, read_prompts(prompts / "train.jsonl"), proxy, seed=args.seed, evaluator=evaluator)
    start = {f"eval_{k}": v for k, v in learner.evaluate().items()}
    history = learner.run(args.steps)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result = {
        "revision": revision,
        "config": config.model_dump(mode="json")["warp"],
        "sft": start,
        "evaluations": [
            {k: v for k, v in m.items() if k == "step" or k.startswith("eval_")} for m in history if "eval_reward" in m
        ],
        "last_steps": history[-5:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"sft": start, "evaluations": result["evaluations"]}, indent=2))


if __name__ == "__main__":
    main()
