"""Benchmark of the reward server: scoring throughput (pairs/s) of 1 server and of 2 replicas
behind `Replicas` (`reward_server.replicas`), under 1, 4 and 8 concurrent callers, against
direct calls of the same model in one process, in the same run; and the seconds from a server's
start to its first answer, and its process's CPU seconds by then, for a reward model and for a
function (the built-in task's gold reward, which every evaluator on that task starts beside the
proxy RM), alternating, 3 of each. Ray may have a worker process prestarted for the first start;
the others start one. And a lone caller's
round trip to a function's server at each of `WAITS` (reward_server.max_wait_ms), the calls
alternating between the servers: what a lone learner's step waits for its rewards.

Each caller (a thread of the driver, standing for a learner) sends requests of 32 pairs, one
after the other; a server batches what arrives together. The model is the built-in task's reward model architecture
(the SFT backbone with a score head); every server and the direct calls use one thread.

Run: .venv/bin/python bench/reward_server.py   (builds the built-in task under bench/out/ once)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from warp_ray.config import RewardServerParams
from warp_ray.config_io import load_config
from warp_ray.data import read_preferences
from warp_ray.reward.model import load_reward_model, score
from warp_ray.reward.server import RewardSource, start_reward_server
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import build_task

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(ROOT / "configs" / "tiny.yaml")  # the built-in task as the demo builds it
REQUEST = 32
WAITS = (0.0, 5.0)
"""max_wait_ms of the lone caller's servers: the default, and the default until 2026-12-02."""


def caller(server, requests: list[tuple[list[str], list[str]]]) -> int:
    """A learner: one request after the other, each waiting for its answer."""
    for prompts, completions in requests:
        ray.get(server.score.remote(prompts, completions))
    return sum(len(p) for p, _ in requests)


def process_cpu_seconds(_) -> float:
    """The CPU seconds of the calling actor's process so far (run in the actor by `__ray_call__`)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_to_first_answer(source: RewardSource, request: tuple[list[str], list[str]]) -> tuple[float, float]:
    """Seconds from starting a server (a Ray worker process, its imports, its model) to its first answer,
    and the CPU seconds its process used by then."""
    start = time.perf_counter()
    server = start_reward_server(source, RewardServerParams(threads=1))
    ray.get(server.score.remote(*request))
    seconds = time.perf_counter() - start
    cpu_seconds = ray.get(server.__ray_call__.remote(process_cpu_seconds))
    ray.kill(server)
    return seconds, cpu_seconds


def lone_caller_ms(request: tuple[list[str], list[str]], calls: int = 100) -> dict[float, dict[str, float]]:
    """Milliseconds of one caller's round trips to a gold-reward server at each of WAITS: median, 10th and 90th
    percentiles of `calls` each."""
    servers = {
        wait: start_reward_server(RewardSource(function=world.gold_reward), RewardServerParams(max_wait_ms=wait))
        for wait in WAITS
    }
    ray.get([server.score.remote(*request) for server in servers.values()])  # started
    seconds = {wait: [] for wait in WAITS}
    for _ in range(calls):
        for wait, server in servers.items():  # alternating: a drift of the machine's speed reaches both
            start = time.perf_counter()
            ray.get(server.score.remote(*request))
            seconds[wait].append(time.perf_counter() - start)
    for server in servers.values():
        ray.kill(server)
    quantiles = {wait: statistics.quantiles(s, n=10) for wait, s in seconds.items()}
    return {wait: {"median": 1000 * q[4], "p10": 1000 * q[0], "p90": 1000 * q[8]} for wait, q in quantiles.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="requests per caller")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reward_server.json")
    args = parser.parse_args()
    task = build_task(TINY.task, ROOT / "bench" / "out" / "task", TINY.warp.max_new_tokens)
    rm = ROOT / "bench" / "out" / "rm"
    model, tokenizer = load_reward_model(task / "sft")
    model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    pairs = read_preferences(task / "preferences" / "train.jsonl")
    batches = [pairs[(r * REQUEST + i) % len(pairs)] for r in range(args.requests) for i in range(REQUEST)]
    requests = [
        ([p["prompt"] for p in batches[i : i + REQUEST]], [p["chosen"] for p in batches[i : i + REQUEST]])
        for i in range(0, len(batches), REQUEST)
    ]

    torch.set_num_threads(1)
    start = time.perf_counter()
    for prompts, completions in requests:
        score(model, tokenizer, prompts, completions, batch_size=REQUEST)
    direct = len(requests) * REQUEST / (time.perf_counter() - start)

    init_ray(num_cpus=2)
    sources = {"reward model": RewardSource(folders=(str(rm),)), "function": RewardSource(function=world.gold_reward)}
    starts = {name: [] for name in sources}
    for _ in range(3):
        for name, source in sources.items():
            starts[name].append(start_to_first_answer(source, requests[0]))
    results = {
        "start_s": {name: [seconds for seconds, _ in timed] for name, timed in starts.items()},
        "start_cpu_s": {name: [cpu for _, cpu in timed] for name, timed in starts.items()},
        "lone_caller_ms": lone_caller_ms(requests[0]),
        "direct_pairs_per_s": direct,
        "request_pairs": REQUEST,
        "replicas": {},
    }
    for replicas in (1, 2):
        server = start_reward_server(RewardSource(folders=(str(rm),)), RewardServerParams(threads=1, replicas=replicas))
        ray.get(server.score.remote(*requests[0]))  # warm up
        results["replicas"][replicas] = {}
        for callers in (1, 4, 8):
            start = time.perf_counter()
            with ThreadPoolExecutor(callers) as pool:
                served = sum(pool.map(caller, [server] * callers, [requests] * callers))
            rate = served / (time.perf_counter() - start)
            results["replicas"][replicas][callers] = {"pairs_per_s": rate, "vs_direct": rate / direct}
        if replicas > 1:
            results["requests_by_replica"] = ray.get(server.load.remote())["served"]
        ray.kill(server)
    ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    print(
        f"\n| scoring ({REQUEST} pairs a request, 1 thread each) | callers | pairs/s | vs direct |\n|---|---|---|---|"
    )
    print(f"| direct calls, one process | 1 | {direct:.0f} | 1.00 |")
    for replicas, by_callers in results["replicas"].items():
        for callers, row in by_callers.items():
            what = "1 RewardServer" if replicas == 1 else f"{replicas} replicas behind Replicas"
            print(f"| {what} | {callers} | {row['pairs_per_s']:.0f} | {row['vs_direct']:.2f} |")
    print(f"\nrequests answered by each replica: {results['requests_by_replica']}; results in {args.out}")
    print("\n| server | start to first answer, s (3 starts) | its process's CPU s by then |\n|---|---|---|")
    for name in starts:
        seconds, cpu = (", ".join(f"{s:.2f}" for s in results[key][name]) for key in ("start_s", "start_cpu_s"))
        print(f"| {name} | {seconds} | {cpu} |")
    print("\n| a lone caller, gold reward | max_wait_ms | round trip ms, median (p10-p90) |\n|---|---|---|")
    for wait, ms in results["lone_caller_ms"].items():
        print(f"| {REQUEST} pairs a request | {wait:g} | {ms['median']:.2f} ({ms['p10']:.2f}-{ms['p90']:.2f}) |")


if __name__ == "__main__":
    main()
