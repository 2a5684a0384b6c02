"""Where `make test`'s time goes, or any command's (`make demo`'s): each test file's wall time, or
each span between two lines the command prints, and how busy the machine's CPUs were meanwhile (all
cores, from /proc/stat every 2 s). A span's idle share is what running its work alongside something
else could recover at best; a busy span is cut only by doing less work. Then which processes did
that work: the CPU seconds of every process the suite or the command started, by kind (a Ray actor's
class, read from the process title Ray gives it; a command's first words otherwise), from
/proc/<pid>/stat every second: what a process did in its last second before it ended is missed.
Those and this process's own CPU seconds, over the cores, are the least wall time the same work
could take here.

Run: .venv/bin/python bench/suite_profile.py [pytest arguments]   (default: the whole suite, tests/)
     .venv/bin/python bench/suite_profile.py --command make demo      (in the current folder, with
     PYTHONUNBUFFERED=1 for the command and every process it starts, so that Python's lines are stamped
     as they are printed; a progress bar's output is passed on at its line's end)
     Linux only (/proc/stat). Run it on an otherwise idle machine: it measures the machine, not pytest.
"""

from __future__ import annotations

import os
import resource
import subprocess
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
    # a worker's Python, not the raylet, whose options name the worker's script
    if Path(words[0]).name.startswith("python") and any(w.endswith("default_worker.py") for w in words):
        return ""
    return " ".join(Path(w).name for w in words[:2])


def stat_fields(pid: str) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces): the 3rd field of
    the line is [0], the parent's pid [1], utime [11], stime [12], the start time [19]."""
    return Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace").rpartition(")")[2].split()


class Processes(threading.Thread):
    """The CPU seconds of each process the suite or the command starts (this process's descendants
    that begin after it), sampled every second: a process that lives under a second is missed, one
    whose parent has ended before it is first seen (a daemon of `ray start`) is not counted. Its kind
    is the first that `process_kind` gives other than ""."""

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
        """(kind, processes, CPU seconds) of the processes started from this one, the most CPU first."""
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


def run_command(command: list[str], starts: list[tuple[float, str]]) -> int:
    """Run `command`, passing its output on; each line it prints, blank ones aside, starts a span (a
    progress bar's carriage returns do not). Its exit status, 128 + the signal if one ended it."""
    if not command:
        raise SystemExit("--command needs a command to run, e.g. --command make demo")
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment)
    except OSError as error:
        raise SystemExit(f"--command {command[0]!r} cannot be run: {error.strerror}") from None
    with run:
        for raw in run.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            line = raw.decode(errors="replace").rsplit("\r", 1)[-1].strip()  # what a terminal shows last
            if line:
                starts.append((time.perf_counter(), line[:70].replace("|", "/")))
    return run.returncode if run.returncode >= 0 else 128 - run.returncode


def by_span(starts: list[tuple[float, str]], samples: list[tuple[float, float]], end: float) -> list[tuple]:
    """(name, seconds, busy share) per run of starts of one name, to the next start of another (a
    test file: from its first test's start to the next file's), the longest first."""
    spans: list[list] = []
    for (start, name), (following, _) in zip(starts, starts[1:] + [(end, "")]):
        if spans and spans[-1][0] == name:
            spans[-1][2] = following
        else:
            spans.append([name, start, following])
    rows = []
    for name, start, stop in spans:
        busy = [share for stamp, share in samples if start < stamp <= stop]
        rows.append((name, stop - start, sum(busy) / len(busy) if busy else float("nan")))
    return sorted(rows, key=lambda row: -row[1])


def main() -> int:
    sampler, starts, processes = Sampler(), Starts(), Processes()
    sampler.start()
    processes.start()
    begin = time.perf_counter()
    if sys.argv[1:2] == ["--command"]:
        spans, code = "output line", run_command(sys.argv[2:], starts.starts)
    else:
        os.chdir(ROOT)
        spans, code = "test file", pytest.main(sys.argv[1:] or ["tests"], plugins=[starts])
    end = time.perf_counter()
    sampler.done.set()
    processes.done.set()
    sampler.join()
    processes.join()
    cores = os.cpu_count()
    mean = sum(share for _, share in sampler.samples) / max(1, len(sampler.samples))
    print(f"\n{end - begin:.0f} s in all; the {cores} cores {mean:.0%} busy on average\n")
    print(f"| {spans} | seconds | CPUs busy | idle core-seconds |\n|---|---|---|---|")
    shown = by_span(starts.starts, sampler.samples, end)
    if spans == "output line":  # most lines are a report's, printed at once
        shown = [row for row in shown if row[1] >= 1]
    for name, seconds, busy in shown:
        if busy != busy:  # NaN: shorter than one sample
            print(f"| {name} | {seconds:.0f} | - | - |")
        else:
            print(f"| {name} | {seconds:.0f} | {busy:.0%} | {seconds * (1 - busy) * cores:.0f} |")
    rows = processes.by_kind()
    own = resource.getrusage(resource.RUSAGE_SELF)
    started, own_seconds = sum(s for _, _, s in rows), own.ru_utime + own.ru_stime
    print(
        f"\n{sum(n for _, n, _ in rows)} processes started, {started:.0f} CPU seconds in all; this process "
        f"{own_seconds:.0f}. On {cores} cores that work takes {(started + own_seconds) / cores:.0f} s at least\n"
    )
    print("| process | started | CPU seconds | per process |\n|---|---|---|---|")
    for kind, count, seconds in rows:
        print(f"| {kind} | {count} | {seconds:.0f} | {seconds / count:.1f} |")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
