"""Where serving time goes: seconds and counts per named phase, summed over a server's life.

The decode thread (infer/session.py, serve/workers.py) and the event loop (serve/app.py) each add
to their own `TimeSpent`, so no lock is needed: one writer per object. `/health` reports the sums
under "timing" and `chatforge bench serve` prints the difference over a run, per generated token.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class TimeSpent:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + count

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def report(self) -> dict:
        """{name: {"s": seconds, "n": count}}, a copy safe to serialize while the owner writes."""
        return {name: {"s": s, "n": self.counts.get(name, 0)} for name, s in list(self.seconds.items())}


def merge_reports(reports) -> dict:
    """Sum several `report()`s (one per replica and the event loop)."""
    total: dict = {}
    for report in reports:
        for name, v in report.items():
            t = total.setdefault(name, {"s": 0.0, "n": 0})
            t["s"] += v["s"]
            t["n"] += v["n"]
    return total
