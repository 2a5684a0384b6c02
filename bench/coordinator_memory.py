"""Benchmark of the coordinator's memory during a WARP merge of M = 4 policies, against 4x one model.

Each policy is put into the object store by an actor of its own, as a learner does
(`Learner.put_weights`: the run's partition, one shard per learner). Then, each in a fresh
process (so that its peak resident memory is that of the merge alone):

- sharded: what `Coordinator.run` does, `distributed_merge.slerp` + `distributed_merge.liti`,
  the tasks running beside the weights, then the next init written to a checkpoint shard by
  shard (`save_model` as `save_iteration` calls it);
- central: the design it replaces, every policy fetched into the coordinator, `merge.slerp` +
  `merge.liti` there, then the same checkpoint in one file.

Peak memory is measured from the process's level before it loads anything, both as RSS (which
also counts the object store's shared pages the process maps by `ray.put` / `ray.get`) and as
private memory (RssAnon), sampled every millisecond.

Run: .venv/bin/python bench/coordinator_memory.py   (GPT-2 124M shapes, float32, ~2 GB each way)
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import ray
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from warp_ray import merge
from warp_ray.checkpoint import load_model_weights, save_model
from warp_ray.coordinator import distributed_merge
from warp_ray.runtime import init_ray
from warp_ray.shards import Layout, Shards, join, partition, put_folder, split, wait_until_computed

ROOT = Path(__file__).resolve().parents[1]
M, ETA = 4, 0.5


@ray.remote(num_cpus=0)
class Policy:
    """A learner's trained policy: the init moved by a random task vector, held by this process."""

    def __init__(self, init: Path, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.weights = {
            k: t + 0.01 * torch.randn(t.shape, generator=generator) for k, t in load_model_weights(init).items()
        }

    def put_weights(self, layout: Layout) -> Shards:
        return [ray.put(shard) for shard in split(self.weights, layout)]


class PeakMemory:
    """Peak resident memory above the level at entry, while the block runs: all of it (RSS, which
    counts the object store's shared pages this process maps by `ray.put` / `ray.get`) and the
    process's private part (RssAnon), sampled every millisecond from /proc/self/status."""

    def __enter__(self) -> "PeakMemory":
        self.start, self.peak, self.running = self.read(), self.read(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    @staticmethod
    def read() -> dict[str, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}

    def sample(self) -> None:
        while self.running:
            self.peak = {k: max(v, self.peak[k]) for k, v in self.read().items()}
            time.sleep(0.001)

    def result(self) -> dict[str, int]:
        return {
            "peak_rss_bytes": self.peak["VmRSS"] - self.start["VmRSS"],
            "peak_private_bytes": self.peak["RssAnon"] - self.start["RssAnon"],
        }


@ray.remote(num_cpus=0)
def sharded(init_folder: Path, policies: list[Shards], layout: Layout, out: Path) -> dict:
    with PeakMemory() as memory:
        start = time.perf_counter()
        # as the coordinator's first iteration does; later ones get it from the merge
        init = put_folder(init_folder, layout)
        merged = distributed_merge.slerp(init, policies)
        next_init = distributed_merge.liti(init, merged, ETA)
        wait_until_computed(next_init)
        save_model((ray.get(shard) for shard in next_init), init_folder, out, len(next_init))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, **memory.result()}


@ray.remote(num_cpus=0)
def central(init_folder: Path, policies: list[Shards], out: Path) -> dict:
    with PeakMemory() as memory:
        start = time.perf_counter()
        init = load_model_weights(init_folder)
        models = [join(ray.get(policy)) for policy in policies]
        merged = merge.slerp(init, models)
        next_init = merge.liti(init, merged, ETA)
        save_model([next_init], init_folder, out)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, **memory.result()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "coordinator_memory")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    init_folder = args.out / "init"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(init_folder)
    model_bytes = sum(t.numel() * t.element_size() for t in load_model_weights(init_folder).values())

    init_ray(num_cpus=2)
    layout = partition(init_folder, M)  # as the coordinator cuts it: a shard per learner
    holders = [Policy.remote(init_folder, seed) for seed in range(1, M + 1)]
    policies = ray.get([h.put_weights.remote(layout) for h in holders])
    results = {}
    for name, run in (
        ("sharded", lambda: sharded.remote(init_folder, policies, layout, args.out / "sharded")),
        ("central", lambda: central.remote(init_folder, policies, args.out / "central")),
    ):
        (args.out / name).mkdir()
        results[name] = ray.get(run())
        for kind in ("rss", "private"):
            results[name][f"peak_{kind}_vs_4x_model"] = results[name][f"peak_{kind}_bytes"] / (M * model_bytes)
    a, b = (load_model_weights(args.out / name) for name in ("sharded", "central"))
    results["max_abs_difference"] = max((a[k] - b[k]).abs().max().item() for k in b)
    results["model_bytes"], results["M"] = model_bytes, M
    ray.shutdown()
    print(json.dumps(results, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
