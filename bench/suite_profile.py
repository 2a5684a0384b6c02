"""Where `make test`'s time goes: each test file's wall time and how busy the machine's CPUs were
meanwhile (all cores, from /proc/stat every 2 s). A file's idle share is what running its work
alongside something else could recover at best; a busy file is cut only by doing less work. Then
which processes did that work: the CPU seconds of every process the suite started, by kind (a Ray
actor's class, read from the process title Ray gives it; a command's first words otherwise), from
/proc/<pid>/stat every second: what a process did in its last second before it ended is missed.

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


def process_kind(pid: str) -> str:
    """What a process is: its Ray actor class or task ("ray::Learner.run" gives "Learner"), or its
    command's program and first argument; "" for a Ray worker not yet given work."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    if not words:
        return ""
    if words[0].startswith("ray::"):
        kind = words[0].removeprefix("ray::").split(".")[0]
        return "" if kind == "IDLE" else kind
    if any(w.endswith("default_worker.py") for w in words):
        return ""
    return " ".join(Path(w).name for w in words[:2])


def stat_fields(pid: str) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces): the 3rd field of
    the line is [0], the parent's pid [1], utime [11], stime [12], the start time [19]."""
    return Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace").rpartition(")")[2].split()


class Processes(threading.Thread):
    """The CPU seconds of each process the suite starts (this process's descendants that begin after
    it), sampled every second: a process that lives under a second is missed, one whose parent has
    ended before it is first seen (a daemon of `ray start`) is not counted. Its kind is the first
    that `process_kind` gives other than ""."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                self.before.add((pid, stat_fields(pid)[19]))
            except OSError:  # ended meanwhile
                pass
        self.seen: dict[tuple[str, str], list] = {}  # (pid, start time): [kind, CPU seconds, parent's pid]
        self.done = threading.Event()

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.done.wait(1.0):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    fields = stat_fields(pid)
                    if (pid, fields[19]) in self.before:
                        continue
                    row = self.seen.get((pid, fields[19])) or ["", 0.0, fields[1]]
                    row[0] = row[0] or process_kind(pid)  # its command line read until it names a kind
                    self.seen[(pid, fields[19])] = row
                except OSError:  # ended meanwhile
                    continue
                row[1] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    def by_kind(self) -> list[tuple[str, int, float]]:
        """(kind, processes, CPU seconds) of the suite's processes, the most CPU first."""
        parents = {pid: parent for (pid, _), (_, _, parent) in self.seen.items()}
        suite = {str(os.getpid())}
        for pid in parents:  # a pid's chain of parents reaches this process: the suite's
            chain, at = [], pid
            while at in parents and at not in suite and at not in chain:
                chain.append(at)
                at = parents[at]
            if at in suite:
                suite.update(chain)
        kinds: dict[str, list] = {}
        for (pid, _), (kind, seconds, _) in self.seen.items():
            if pid in suite:
                row = kinds.setdefault(kind or "Ray worker, never given work", [0, 0.0])
                row[0] += 1
                row[1] += seconds
        return sorted(((k, n, s) for k, (n, s) in kinds.items()), key=lambda row: -row[2])


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
    sampler, starts, processes = Sampler(), Starts(), Processes()
    sampler.start()
    processes.start()
    begin = time.perf_counter()
    code = pytest.main(sys.argv[1:] or ["tests"], plugins=[starts])
    end = time.perf_counter()
    sampler.done.set()
    processes.done.set()
    sampler.join()
    processes.join()
    cores = os.cpu_count()
    mean = sum(share for _, share in sampler.samples) / max(1, len(sampler.samples))
    print(f"\n{end - begin:.0f} s in all; the {cores} cores {mean:.0%} busy on average\n")
    print("| test file | seconds | CPUs busy | idle core-seconds |\n|---|---|---|---|")
    for name, seconds, busy in by_file(starts.starts, sampler.samples, end):
        if busy != busy:  # NaN: shorter than one sample
            print(f"| {name} | {seconds:.0f} | - | - |")
        else:
            print(f"| {name} | {seconds:.0f} | {busy:.0%} | {seconds * (1 - busy) * cores:.0f} |")
    rows = processes.by_kind()
    print(f"\n{sum(n for _, n, _ in rows)} processes started, {sum(s for _, _, s in rows):.0f} CPU seconds in all\n")
    print("| process | started | CPU seconds | per process |\n|---|---|---|---|")
    for kind, count, seconds in rows:
        print(f"| {kind} | {count} | {seconds:.0f} | {seconds / count:.1f} |")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
