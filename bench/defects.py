"""The five RL-path defects fixed in docs/results.md ("Defects: before and after"), each measured
as it was and as it is, in one run on the built-in task of configs/tiny.yaml:

a. What the reward model reads: its validation accuracy on completions as it was trained on
   them, and as RL fed them before (vLLM's text, with its leading space, joined by "p c").
b. The length limit: the SFT's completions cut by 24 tokens (RL and evaluation before) and by
   the shared limit (48, preference sampling before and all three now), with their gold reward.
c. Shared randomness: one batch of the learner's (8 prompts x 4 samples), drawn with replacement
   and seeded per call (vLLM seeds sample k with seed + k) as before, and drawn without
   replacement, one seed per sample, as now: repeated prompts and duplicate completions, and
   the engine's sampling rate both ways (a request per sample now, one per prompt before).
d. Temperature: the engine samples at T = 0.9; the gap between its log-probs and the learner's,
   computed on logits (before) and on logits / T (now).
e. The optimizer: the learning rate of the first step under DeepSpeed's WarmupLR (before) and
   under linear_warmup (now); the weight decay of the AdamW that DeepSpeed built without one named.

Run: .venv/bin/python bench/defects.py   (builds the task and trains WARM under bench/out/defects once)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import ray
import torch
from deepspeed.runtime.lr_schedules import WarmupLR
from transformers import AutoModelForCausalLM, AutoTokenizer

from warp_ray.config import WarpConfig
from warp_ray.config_io import load_config
from warp_ray.data import read_preferences, read_prompts
from warp_ray.driver import run_warm
from warp_ray.learner.learner import PromptOrder
from warp_ray.learner.rank import deepspeed_config, linear_warmup
from warp_ray.logprobs import token_logprobs
from warp_ray.reward.model import load_reward_model, pairwise_accuracy, score
from warp_ray.rollout.worker import RolloutWorker, sample
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import task_inputs

ROOT = Path(__file__).resolve().parents[1]


def old_join_accuracy(rm_folder: Path, pairs: list[dict]) -> dict[str, float]:
    """(a) Validation accuracy of the RM on the text it was trained on, and on the text RL gave it."""
    model, tokenizer = load_reward_model(rm_folder)
    prompts = [p["prompt"] for p in pairs]

    def accuracy(join) -> float:
        chosen = score_texts(model, tokenizer, [join(p, q["chosen"]) for p, q in zip(prompts, pairs)])
        rejected = score_texts(model, tokenizer, [join(p, q["rejected"]) for p, q in zip(prompts, pairs)])
        return pairwise_accuracy(chosen, rejected)

    as_trained = pairwise_accuracy(
        score(model, tokenizer, prompts, [p["chosen"] for p in pairs]),
        score(model, tokenizer, prompts, [p["rejected"] for p in pairs]),
    )
    return {
        "as trained (now in RL too)": as_trained,
        "as RL fed it before (vLLM text, 'p c')": accuracy(lambda p, c: f"{p}  {c}"),
    }  # vLLM's leading space


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, padding_side="right")
    return model(**encoded).logits[:, 0].float()


def length_limits(engine, prompts: list[str], temperature: float, limits: tuple[int, ...]) -> dict[int, dict]:
    """(b) The SFT sampled at each limit: the share cut, and the mean gold reward."""
    out = {}
    for limit in limits:
        samples = [
            (p, s)
            for p, group in zip(prompts, sample([engine], prompts, 16, temperature, limit, seed=0))
            for s in group
        ]
        out[limit] = {
            "samples": len(samples),
            "cut by the limit": statistics.mean(s["truncated"] for _, s in samples),
            "mean gold reward": statistics.mean(world.gold_reward(p, s["text"]) for p, s in samples),
        }
    return out


def shared_randomness(engine, prompts: list[str], config: WarpConfig, batches: int) -> dict[str, dict]:
    """(c) The learner's batches as drawn and seeded before, and now."""
    warp = config.warp

    def before(rng: random.Random) -> list[tuple[str, tuple]]:
        drawn = [rng.choice(prompts) for _ in range(warp.batch_size)]
        seed = rng.randrange(2**31)  # one per call: vLLM's n samples of a request, seeded seed + k
        groups = ray.get(
            engine.__ray_call__.remote(
                _one_request_per_prompt, drawn, warp.samples_per_prompt, warp.temperature, warp.max_new_tokens, seed
            )
        )
        return [(p, tuple(ids)) for p, group in zip(drawn, groups) for ids in group]

    def now(rng: random.Random, order: PromptOrder) -> list[tuple[str, tuple]]:
        drawn = order.draw(warp.batch_size)
        groups = sample(
            [engine], drawn, warp.samples_per_prompt, warp.temperature, warp.max_new_tokens, rng.randrange(2**31)
        )
        return [(p, tuple(s["token_ids"])) for p, group in zip(drawn, groups) for s in group]

    def measures(rows_per_batch: list[list[tuple[str, tuple]]], seconds: float) -> dict[str, float]:
        repeated = [len({p for p, _ in rows}) < warp.batch_size for rows in rows_per_batch]
        duplicates = [
            sum(completions.count(c) > 1 for c in completions) / len(completions)
            for completions in ([c for _, c in rows] for rows in rows_per_batch)
        ]
        across = [sum(1 for (p, c) in rows for (q, d) in rows if p != q and c == d) for rows in rows_per_batch]
        return {
            "batches with a repeated prompt": statistics.mean(repeated),
            "completions equal to another of their batch": statistics.mean(duplicates),
            "identical completions of different prompts, per batch": statistics.mean(across),
            "sampled tokens per second": sum(len(c) for rows in rows_per_batch for _, c in rows) / seconds,
        }

    before(random.Random(-1))  # warm-up
    rng, start = random.Random(warp.seed), time.perf_counter()
    old = [before(rng) for _ in range(batches)]
    old_seconds = time.perf_counter() - start
    rng = random.Random(warp.seed)
    order, start = PromptOrder(prompts, rng), time.perf_counter()
    new = [now(rng, order) for _ in range(batches)]
    return {"before": measures(old, old_seconds), "now": measures(new, time.perf_counter() - start)}


def _one_request_per_prompt(
    worker, prompts: list[str], n: int, temperature: float, max_new_tokens: int, seed: int
) -> list:
    """In the engine's actor: the sampling before the fix, one request of n samples per prompt under one seed."""
    from vllm import SamplingParams

    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, logprobs=0, seed=seed)
    return [[list(c.token_ids) for c in out.outputs] for out in worker.llm.generate(prompts, params, use_tqdm=False)]


@torch.no_grad()
def temperature_gap(engine, sft: Path, prompts: list[str], temperature: float, max_new_tokens: int) -> dict[str, float]:
    """(d) Mean |engine log-prob - learner log-prob| per sampled token, the learner on logits or logits / T."""
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    gaps = {"learner on logits (before)": [], "learner on logits / T (now)": []}
    for group in sample([engine], prompts, 4, temperature, max_new_tokens, seed=0):
        for s in group:
            ids = torch.tensor([s["prompt_token_ids"] + s["token_ids"]])
            logits = model(ids).logits[0, len(s["prompt_token_ids"]) - 1 : -1]
            engine_logprobs = torch.tensor(s["logprobs"])
            for key, scale in zip(gaps, (1.0, temperature)):
                learner = token_logprobs(logits / scale, torch.tensor(s["token_ids"]))
                gaps[key] += (learner - engine_logprobs).abs().tolist()
    return {key: statistics.mean(values) for key, values in gaps.items()}


def optimizer_settings(config: WarpConfig) -> dict[str, dict]:
    """(e) The first step's learning rate and the weight decay, before and now."""
    warp = config.warp
    params = [torch.nn.Parameter(torch.zeros(1))]
    # what DeepSpeed built from {"type": "Adam", "torch_adam": true}
    old_optimizer = torch.optim.AdamW(params, lr=warp.lr)
    WarmupLR(
        old_optimizer,
        warmup_min_lr=0.0,
        warmup_max_lr=warp.lr,
        warmup_num_steps=max(1, warp.warmup_steps),
        warmup_type="linear",
    )
    new_params = deepspeed_config(config)["optimizer"]["params"]
    new_optimizer = torch.optim.AdamW(params, lr=warp.lr, weight_decay=new_params["weight_decay"])
    linear_warmup(warp.warmup_steps)(new_optimizer)
    return {
        name: {"first step's lr": o.param_groups[0]["lr"], "weight decay": o.param_groups[0]["weight_decay"]}
        for name, o in (("before", old_optimizer), ("now", new_optimizer))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="learner batches drawn each way for (c)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "defects.json")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"paths.output_dir={ROOT / 'bench' / 'out' / 'defects'}"])
    sft, prompt_folder, preferences, _ = task_inputs(config)
    init_ray(num_cpus=2)
    warm = config.paths.output_dir / "rm" / "warm"
    if not warm.is_dir():
        run_warm(config)
    held_out = read_prompts(prompt_folder / "held_out.jsonl")
    train = read_prompts(prompt_folder / "train.jsonl")
    engine = RolloutWorker.remote(
        str(sft), max_model_len=AutoTokenizer.from_pretrained(sft).model_max_length, in_process=True
    )
    warp = config.warp
    results = {
        "a. reward model input: WARM's validation accuracy": old_join_accuracy(
            warm, read_preferences(preferences / "validation.jsonl")
        ),
        "b. SFT completions by length limit": length_limits(
            engine, held_out, warp.temperature, (24, warp.max_new_tokens)
        ),
        "c. a learner's batches": shared_randomness(engine, train, config, args.batches),
        "d. engine vs learner log-prob gap per token": temperature_gap(
            engine, sft, held_out, warp.temperature, warp.max_new_tokens
        ),
        "e. optimizer": optimizer_settings(config),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
