"""Benchmark of a learner on the built-in task, every ratio against a baseline of the same run.

1. Rollouts: a vLLM engine (a `RolloutWorker` actor), with its core and worker in child
   processes (vLLM's default) and in the actor's own process (`resources.rollout_in_process`),
   against `transformers` `generate` in this process, on the same batch (the tiny config's 8
   prompts x 4 samples, its length limit and temperature): generated tokens per second, and each engine's
   start (actor created to first completion). The two engines also on 8 times that batch.
2. Weight sync as a fraction of step time, through the object store, through the broadcast
   group (gloo here), and in memory to an engine in the rank's process (`resources.colocate`),
   one learner each (ZeRO-2, fp32), of K = 1 rank and one engine, and with `--ranks 1 2` also of
   K = 2 ranks and two engines (colocated: one in each rank).
3. The Ray + DeepSpeed learner's step against a bare single-process torch REINFORCE loop doing
   the same work (generate with `transformers`, gold reward, forward and backward, Adam with
   warm-up and clipping, EMA update): whole steps, and the update phase alone (forward,
   backward, optimizer, EMA), which is where Ray and DeepSpeed add their overhead.

Run: .venv/bin/python bench/learner.py   (builds the built-in task under bench/out/ once)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from warp_ray.config import WarpConfig
from warp_ray.config_io import load_config
from warp_ray.data import read_prompts
from warp_ray.learner.learner import Learner
from warp_ray.learner.reinforce import reinforce_loss
from warp_ray.logprobs import pack, token_logprobs
from warp_ray.merge import ema_update_
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.rollout.worker import RolloutWorker
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import build_task

ROOT = Path(__file__).resolve().parents[1]


class BareLoop:
    """REINFORCE as one would write it without Ray or DeepSpeed: one process, plain torch."""

    def __init__(self, config: WarpConfig, sft: Path):
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(sft, padding_side="left")
        self.policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
        self.anchor = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval().requires_grad_(False)
        warp = config.warp
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=warp.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / max(1, warp.warmup_steps))
        )

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[tuple[str, list[int], list[int]]]:
        """(prompt, prompt ids, completion ids up to and with EOS) for every sample, grouped by prompt."""
        warp, tok = self.config.warp, self.tokenizer
        encoded = tok(prompts, return_tensors="pt", padding=True)
        out = self.policy.generate(
            **encoded,
            do_sample=True,
            temperature=warp.temperature,
            max_new_tokens=warp.max_new_tokens,
            num_return_sequences=warp.samples_per_prompt,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        rows = []
        for i, row in enumerate(out[:, encoded.input_ids.shape[1] :].tolist()):
            completion = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
            prompt = prompts[i // warp.samples_per_prompt]
            rows.append((prompt, tok(prompt).input_ids, completion))
        return rows

    def step(self, prompts: list[str]) -> tuple[float, float]:
        """Whole step and update-phase seconds."""
        warp, start = self.config.warp, time.perf_counter()
        torch.set_num_threads(2)  # generation gets the machine, as the vLLM engine does
        rows = self.generate(prompts)
        rewards = torch.tensor(
            [world.gold_reward(p, self.tokenizer.decode(c, skip_special_tokens=True)) for p, _, c in rows]
        )
        torch.set_num_threads(1)  # the update gets one thread, as a learner rank does
        update = time.perf_counter()
        input_ids, attention, completion = pack([(p, c) for _, p, c in rows], self.tokenizer.pad_token_id)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "use_cache": False}  # as the rank's step
        logits = self.policy(**inputs).logits[:, :-1] / warp.temperature
        policy = token_logprobs(logits, input_ids[:, 1:])
        with torch.no_grad():
            anchor_logits = self.anchor(**inputs).logits[:, :-1] / warp.temperature
            anchor = token_logprobs(anchor_logits, input_ids[:, 1:])
        loss, _ = reinforce_loss(
            policy, anchor, completion[:, 1:].float(), rewards, warp.beta, warp.samples_per_prompt, warp.baseline
        )
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        ema_update_(self.anchor.state_dict(), self.policy.state_dict(), warp.mu)
        end = time.perf_counter()
        return end - start, end - update


def started_engine(sft: Path, in_process: bool) -> tuple[ray.actor.ActorHandle, float]:
    """A rollout engine and the seconds from its creation to its first completion."""
    start = time.perf_counter()
    engine = RolloutWorker.remote(
        str(sft), max_model_len=AutoTokenizer.from_pretrained(sft).model_max_length, in_process=in_process
    )
    ray.get(engine.generate.remote(["the"], 1, 1.0, 1))
    return engine, time.perf_counter() - start


def generation(
    config: WarpConfig, sft: Path, prompts: list[str], rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Generated tokens per second of vLLM (both engine layouts) and of transformers (1 and 2
    threads) on one batch, the engines also on 8 copies of it; the engines' start seconds."""
    warp = config.warp
    engines, starts = {}, {}
    for name, in_process in (("vllm", False), ("vllm_in_process", True)):  # one at a time: starts are not contended
        engines[name], starts[name] = started_engine(sft, in_process)
    bare = BareLoop(config, sft)
    rates: dict[str, list[float]] = {
        name: []
        for name in (*engines, *(f"{e}_x8" for e in engines), "transformers_1_thread", "transformers_2_threads")
    }
    for r in range(rounds + 1):  # round 0 warms up
        results = {}
        for name, engine in engines.items():
            for suffix, batch in (("", prompts), ("_x8", prompts * 8)):
                start = time.perf_counter()
                groups = ray.get(
                    engine.generate.remote(batch, warp.samples_per_prompt, warp.temperature, warp.max_new_tokens)
                )
                results[name + suffix] = sum(len(s["token_ids"]) for g in groups for s in g) / (
                    time.perf_counter() - start
                )
        for threads in (1, 2):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            tokens = sum(len(c) for _, _, c in bare.generate(prompts))
            results[f"transformers_{threads}_thread{'s' if threads > 1 else ''}"] = tokens / (
                time.perf_counter() - start
            )
        if r:
            for k, v in results.items():
                rates[k].append(v)
    for engine in engines.values():
        ray.kill(engine)
    return {k: statistics.median(v) for k, v in rates.items()}, starts


LAYOUTS = {
    "object_store": {"colocate": False, "rollout_in_process": True, "weight_sync": "object_store"},
    "broadcast": {"colocate": False, "rollout_in_process": True, "weight_sync": "broadcast"},
    "colocated": {"colocate": True, "weight_sync": "auto"},
}
"""How the weights reach the engine: an engine actor's through the object store or the broadcast group, or
the engine in the rank's process (resources.colocate), in memory."""


def learner_steps(config: WarpConfig, task: Path, layout: str, steps: int, ranks: int) -> dict[str, float]:
    resources = {**LAYOUTS[layout], "ranks_per_learner": ranks, "rollout_workers_per_learner": ranks}
    config = WarpConfig.model_validate({**config.model_dump(), "resources": config.resources.model_dump() | resources})
    start = time.perf_counter()
    learner = Learner(
        config,
        task / "sft",
        read_prompts(task / "prompts" / "train.jsonl"),
        RewardServer.remote(RewardSource(function=world.gold_reward)),
        seed=0,
    )
    start_seconds = time.perf_counter() - start
    learner.run(3, desc=f"warm-up ({layout})")
    history = learner.run(steps, desc=layout)
    learner.close()
    medians = {
        k: statistics.median(m[k] for m in history)
        for k in ("seconds", "rollout_seconds", "update_seconds", "sync_seconds")
    }
    return {**medians, "start_seconds": start_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="measured steps of each learner and of the bare loop")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1], help="learners of K ranks and K engines, each K")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "learner.json")
    args = parser.parse_args()
    config = load_config(ROOT / "configs" / "tiny.yaml")
    task = build_task(config.task, ROOT / "bench" / "out" / "task", config.warp.max_new_tokens)
    prompts = read_prompts(task / "prompts" / "train.jsonl")[: config.warp.batch_size]
    init_ray(num_cpus=2)

    rates, starts = generation(config, task / "sft", prompts, rounds=5)
    learners = {
        layout + (f", K = {k}" if k > 1 else ""): learner_steps(config, task, layout, args.steps, k)
        for k in args.ranks
        for layout in LAYOUTS
    }
    bare = BareLoop(config, task / "sft")
    for _ in range(3):
        bare.step(prompts)
    timings = [bare.step(prompts) for _ in range(args.steps)]
    bare_step, bare_update = statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)

    results = {
        "tokens_per_s": rates,
        "engine_start_seconds": starts,
        "learner": learners,
        "bare_loop": {"seconds": bare_step, "update_seconds": bare_update},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| rollouts | tokens/s | vs transformers (1 thread / 2 threads) |\n|---|---|---|")
    for name, rate in ((n, r) for n, r in rates.items() if not n.endswith("_x8")):  # the same batch as transformers
        print(
            f"| {name} | {rate:.0f} | {rate / rates['transformers_1_thread']:.2f} / "
            f"{rate / rates['transformers_2_threads']:.2f} |"
        )
    print("\n| vLLM engine | start s | start vs child processes | tokens/s vs child processes |\n|---|---|---|---|")
    for name, seconds in starts.items():
        print(
            f"| {name} | {seconds:.1f} | {seconds / starts['vllm']:.2f} | {rates[name] / rates['vllm']:.2f} "
            f"(x8 batch: {rates[name + '_x8'] / rates['vllm_x8']:.2f}) |"
        )
    print(
        "\n| learner start (tiny config, engines in process) | "
        + " | ".join(f"{s}: {t['start_seconds']:.1f} s" for s, t in learners.items())
        + " |"
    )
    print("\n| step (medians) | s/step | rollout s | update s | sync s | sync / step | step vs bare | update vs bare |")
    print("|---|---|---|---|---|---|---|---|")
    for layout, t in learners.items():
        print(
            f"| learner, {layout} | {t['seconds']:.3f} | {t['rollout_seconds']:.3f} | {t['update_seconds']:.3f} | "
            f"{t['sync_seconds']:.3f} "
            f"| {t['sync_seconds'] / t['seconds']:.1%} | {t['seconds'] / bare_step:.2f} | "
            f"{t['update_seconds'] / bare_update:.2f} |"
        )
    print(
        f"| bare torch loop | {bare_step:.3f} | {bare_step - bare_update:.3f} | {bare_update:.3f} | - | - | 1.00 | "
        "1.00 |"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
