"""bench/suite_profile.py on a command: its spans between printed lines, and the CPU seconds of what it started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A CPU-bound second and a half, a line every half second of it (one span), then more than a second
# asleep, so that the profiler's once-a-second look at the process sees all of its spinning; then the
# last line, a span under a second.
COMMAND = """import time
start = time.process_time()
for tick in (0.5, 1.0, 1.5):
    print("spinning", flush=True)
    while time.process_time() - start < tick:
        pass
print()
print("asleep", flush=True)
time.sleep(1.2)
print("done", flush=True)
"""


def test_a_commands_spans_follow_its_lines_and_its_cpu_seconds_are_counted():
    report = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite_profile.py"), "--command", sys.executable, "-c", COMMAND],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert report.startswith("spinning\n" * 3 + "\nasleep\ndone\n")  # the command's output passed on
    spans = re.findall(r"^\| ([a-z ]*) \| (\d+) \|", report, re.MULTILINE)
    assert sorted(name for name, _ in spans) == ["asleep", "spinning"]  # not the blank line, nor "done"
    assert all(int(seconds) in (1, 2) for _, seconds in spans)
    (seconds,) = re.findall(r"^\| python -c \| 1 \| (\d+) \|", report, re.MULTILINE)
    assert int(seconds) in (1, 2)  # 1.5 CPU seconds, rounded
    started, own, cores, floor = map(
        int,
        re.search(
            r"(\d+) CPU seconds in all; this process (\d+)\. On (\d+) cores that work takes (\d+) s at least", report
        ).groups(),
    )
    assert started >= int(seconds) and abs(floor - (started + own) / cores) <= 1  # each figure rounded
