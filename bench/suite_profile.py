"""Where `make test`'s time goes: each test file's wall time and how busy the machine's CPUs were
meanwhile (all cores, from /proc/stat every 2 s). A file's idle share is what running its work
alongside something else could recover at best; a busy file is cut only by doing less work.

Run: .venv/bin/python bench/suite_profile.py [pytest arguments]   (default: the whole suite, tests/)
     Linux only (/proc/stat). Run it on an otherwise idle machine: it measures the machine, not pytest.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVERY_S = 2.0


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


class Sampler(threading.Thread):
    """The share of the CPUs busy in each EVERY_S, stamped with its end."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        busy, total = cpu_times()
        while not self.done.wait(EVERY_S):
            now_busy, now_total = cpu_times()
            self.samples.append((time.perf_counter(), (now_busy - busy) / max(1, now_total - total)))
            busy, total = now_busy, now_total


class Starts:
    """A pytest plugin that stamps the start of every test."""

    def __init__(self):
        self.starts: list[tuple[float, str]] = []

    def pytest_runtest_logstart(self, nodeid, location):
        self.starts.append((time.perf_counter(), nodeid.split("::")[0]))


def by_file(starts: list[tuple[float, str]], samples: list[tuple[float, float]], end: float) -> list[tuple]:
    """(file, seconds, busy share) per test file, from its first test's start to the next file's."""
    spans: dict[str, list[float]] = {}
    for (start, name), (following, _) in zip(starts, starts[1:] + [(end, "")]):
        spans.setdefault(name, [start, following])[1] = following
    rows = []
    for name, (start, stop) in spans.items():
        busy = [share for stamp, share in samples if start < stamp <= stop]
        rows.append((name, stop - start, sum(busy) / len(busy) if busy else float("nan")))
    return sorted(rows, key=lambda row: -row[1])


def main() -> int:
    os.chdir(ROOT)
    sampler, starts = Sampler(), Starts()
    sampler.start()
    begin = time.perf_counter()
    code = pytest.main(sys.argv[1:] or ["tests"], plugins=[starts])
    end = time.perf_counter()
    sampler.done.set()
    sampler.join()
    cores = os.cpu_count()
    mean = sum(share for _, share in sampler.samples) / max(1, len(sampler.samples))
    print(f"\n{end - begin:.0f} s in all; the {cores} cores {mean:.0%} busy on average\n")
    print("| test file | seconds | CPUs busy | idle core-seconds |\n|---|---|---|---|")
    for name, seconds, busy in by_file(starts.starts, sampler.samples, end):
        if busy != busy:  # NaN: shorter than one sample
            print(f"| {name} | {seconds:.0f} | - | - |")
        else:
            print(f"| {name} | {seconds:.0f} | {busy:.0%} | {seconds * (1 - busy) * cores:.0f} |")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
