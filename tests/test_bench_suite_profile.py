"""bench/suite_profile.py on a command: its spans between printed lines, and the CPU seconds of what it started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A CPU-bound second and a half, a line every half second of it (one span; printed without a flush,
# as most commands print), then more than a second asleep, so that the profiler's once-a-second look at
# the process sees all of its spinning; then the last line, a span under a second, and a failure.
COMMAND = """import time
start = time.process_time()
for tick in (0.5, 1.0, 1.5):
    print("spinning")
    while time.process_time() - start < tick:
        pass
print()
print("asleep")
time.sleep(1.2)
print("done")
raise SystemExit(3)
"""


def test_a_commands_spans_follow_its_lines_and_its_cpu_seconds_are_counted():
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite_profile.py"), "--command", sys.executable, "-c", COMMAND],
        capture_output=True,
        text=True,
    )
    report = run.stdout
    assert run.returncode == 3, run.stderr  # the command's exit status
    assert report.startswith("spinning\n" * 3 + "\nasleep\ndone\n")  # the command's output passed on
    spans = re.findall(r"^\| ([a-z ]*) \| (\d+) \|", report, re.MULTILINE)
    assert sorted(name for name, _ in spans) == ["asleep", "spinning"]  # not the blank line, nor "done"
    assert all(1 <= int(seconds) <= 3 for _, seconds in spans)  # 1.5 CPU seconds on a core others may share
    (seconds,) = re.findall(rf"^\| {re.escape(Path(sys.executable).name)} -c \| 1 \| (\d+) \|", report, re.MULTILINE)
    assert int(seconds) in (1, 2)  # 1.5 CPU seconds, rounded
    started, own, cores, floor = map(
        int,
        re.search(
            r"(\d+) CPU seconds in all; this process (\d+)\. On (\d+) cores that work takes (\d+) s at least", report
        ).groups(),
    )
    assert started >= int(seconds) and abs(floor - (started + own) / cores) <= 1  # each figure rounded
