"""The reward server under load, and killed under load: 8 learners (Ray actors, processes of
their own) send requests of 32 pairs, one after the other, for `--seconds`; then, for
`--fault-seconds`, the same while the server's process is killed (SIGKILL) once.

It reports, for the steady phase, the throughput (and its ratio to direct calls of the same
model in one process, measured in the same run), the requests sent, answered and served (the
server's own count: a request served twice would show), the server's resident memory in each
half of the phase (bounded: the second half's peak is not above the first's, whose batches
already took every shape); for the fault phase, that every request got one answer equal to a direct call of the
model, the longest wait, and that a new server process took over. Every answer is checked
against the scores of a direct call (to 1e-4): an answer lost, sent twice or sent to the
wrong caller would show.

Run: .venv/bin/python bench/reward_server_load.py --seconds 180 --fault-seconds 60
     (builds the built-in task under bench/out/ once; tests/test_reward_server.py runs it shorter)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from warp_ray.config import RewardServerParams
from warp_ray.config_io import load_config
from warp_ray.data import read_preferences
from warp_ray.reward.model import load_reward_model, score
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.runtime import init_ray
from warp_ray.task.build import build_task

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(ROOT / "configs" / "tiny.yaml")  # the built-in task as the demo builds it
REQUEST, DISTINCT, LEARNERS = 32, 64, 8
LOST_AFTER_S = 120


@ray.remote(num_cpus=0)
class LoadLearner:
    """Stands for a learner's calls: request after request, each waiting for its answer."""

    def __init__(self, server, requests: list[tuple[list[str], list[str]]], offset: int):
        self.server, self.requests, self.offset = server, requests, offset

    def run(self, until: float) -> list[dict]:
        answers, n = [], 0
        while time.time() < until:
            k = (self.offset + n) % len(self.requests)
            start = time.time()
            try:
                scores = ray.get(self.server.score.remote(*self.requests[k]), timeout=LOST_AFTER_S)
            except ray.exceptions.GetTimeoutError:
                scores = None  # lost
            answers.append({"request": k, "scores": scores, "seconds": time.time() - start})
            n += 1
        return answers


def server_process() -> psutil.Process | None:
    """The reward server's process among this driver's cluster's (its raylet's workers descend from it)."""
    for process in psutil.Process().children(recursive=True):
        try:
            if any("RewardServer" in part for part in process.cmdline()):
                return process
        except psutil.NoSuchProcess:
            pass
    return None


def phase(
    server, learners, seconds: float, kill_after: float | None = None
) -> tuple[list[list[dict]], list[tuple[float, float]], dict]:
    """Run the learners for `seconds`; sample the server's RSS each second; kill it once after `kill_after` seconds."""
    start, memory, killed = time.time(), [], {}
    runs = [learner.run.remote(start + seconds) for learner in learners]

    def watch() -> None:
        while time.time() < start + seconds:
            process = server_process()
            if process is not None:
                try:
                    memory.append((time.time() - start, process.memory_info().rss / 2**20))
                    if kill_after is not None and not killed and time.time() - start >= kill_after:
                        killed.update(pid=process.pid, at=time.time() - start)
                        os.kill(process.pid, signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    answers = ray.get(runs)
    watcher.join()
    return answers, memory, killed


def tally(answers: list[list[dict]], expected: list[list[float]]) -> dict:
    """Requests sent, answered, lost (no answer within LOST_AFTER_S), answered with scores other than
    a direct call's on the same request, and the longest wait."""
    sent = [a for learner in answers for a in learner]
    answered = [a for a in sent if a["scores"] is not None]
    wrong = sum(
        not torch.allclose(torch.tensor(a["scores"]), torch.tensor(expected[a["request"]]), atol=1e-4) for a in answered
    )
    return {
        "requests_sent": len(sent),
        "requests_answered": len(answered),
        "requests_lost": len(sent) - len(answered),
        "wrong_answers": wrong,
        "longest_wait_s": max(a["seconds"] for a in sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180, help="steady load")
    parser.add_argument("--fault-seconds", type=float, default=60, help="load during which the server is killed once")
    parser.add_argument(
        "--rm", type=Path, help="reward model folder (default: a fresh head on the built-in task's SFT)"
    )
    parser.add_argument("--pairs", type=Path, help="preference JSONL (default: the built-in task's)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=RewardServerParams().max_wait_ms,
        help="the server's reward_server.max_wait_ms",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reward_server_load.json")
    args = parser.parse_args()
    if args.rm is None:
        task = build_task(TINY.task, ROOT / "bench" / "out" / "task", TINY.warp.max_new_tokens)
        args.rm, args.pairs = ROOT / "bench" / "out" / "rm", task / "preferences" / "train.jsonl"
        model, tokenizer = load_reward_model(task / "sft")
        model.save_pretrained(args.rm)
        tokenizer.save_pretrained(args.rm)
    pairs = read_preferences(args.pairs)
    requests = [
        (
            [pairs[(r * REQUEST + i) % len(pairs)]["prompt"] for i in range(REQUEST)],
            [pairs[(r * REQUEST + i) % len(pairs)]["chosen"] for i in range(REQUEST)],
        )
        for r in range(DISTINCT)
    ]
    model, tokenizer = load_reward_model(args.rm)
    torch.set_num_threads(1)  # as the server
    start = time.perf_counter()
    expected = [score(model, tokenizer, p, c, batch_size=REQUEST).tolist() for p, c in requests]
    direct = DISTINCT * REQUEST / (time.perf_counter() - start)  # the baseline: the same model called in one process

    init_ray(num_cpus=2)
    server = RewardServer.remote(
        RewardSource(folders=(str(args.rm),)), RewardServerParams(threads=1, max_wait_ms=args.max_wait_ms)
    )
    ray.get(server.score.remote(*requests[0]))  # loaded
    learners = [LoadLearner.remote(server, requests, offset=m * DISTINCT // LEARNERS) for m in range(LEARNERS)]
    ray.get([learner.__ray_ready__.remote() for learner in learners])  # their processes started: the clock starts now
    served_before = ray.get(server.stats.remote())

    answers, memory, _ = phase(server, learners, args.seconds)
    served = {k: v - served_before[k] for k, v in ray.get(server.stats.remote()).items()}
    halves = [[rss for t, rss in memory if (t < args.seconds / 2) == first] for first in (True, False)]
    steady = {
        "seconds": args.seconds,
        "learners": LEARNERS,
        "pairs_per_request": REQUEST,
        "max_wait_ms": args.max_wait_ms,
        **tally(answers, expected),
        "requests_served": served["requests"],
        "batches": served["batches"],
        "rss_mb": {"first_half_max": max(halves[0]), "second_half_max": max(halves[1]), "last": halves[1][-1]},
    }
    steady["pairs_per_s"] = steady["requests_answered"] * REQUEST / args.seconds
    steady["direct_pairs_per_s"], steady["vs_direct"] = direct, steady["pairs_per_s"] / direct

    answers, _, killed = phase(server, learners, args.fault_seconds, kill_after=args.fault_seconds / 4)
    after = server_process()
    fault = {
        "seconds": args.fault_seconds,
        "killed_pid": killed.get("pid"),
        "killed_at_s": killed.get("at"),
        "new_pid": after.pid if after else None,
        **tally(answers, expected),
    }
    ray.shutdown()
    results = {"steady": steady, "fault": fault}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
