"""Progress lines with rate and ETA for long jobs (they land in the job's Snakemake log)."""

from __future__ import annotations

import logging
import time


class Progress:
    """Counts work done and logs `done / total unit, rate, ETA` at most every `every_s` seconds and at the end.

    `total_is_bound`: the work may end before `total` (greedy decoding stops when every row has), so the ETA is
    an upper bound and says so."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str, every_s: float = 10.0,
                 total_is_bound: bool = False) -> None:
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.total_is_bound = total_is_bound
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int, note: str = "") -> None:
        """Count `n` more; `note` (what else is worth knowing now) is appended to the line if one is logged."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.log.info("%s", self.line(now - self.start, note))

    def line(self, elapsed: float, note: str = "") -> str:
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        bound = "at most " if self.total_is_bound else ""
        return (f"{self.what}: {self.done:,} / {self.total:,} {self.unit} ({rate:,.0f} {self.unit}/s, "
                f"elapsed {elapsed:.0f} s, ETA {bound}{eta:.0f} s){f'; {note}' if note else ''}")
