"""Wall-clock laps, for the manifests' and reports' timings."""

from __future__ import annotations

import time


class Laps(dict):
    """Seconds since the previous lap (or the start), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self[name] = now - self.last
        self.last = now
