"""A one-line progress bar for fit(progress=True)."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second on a terminal;
    elsewhere (CI logs, pipes) only the final line is written."""

    def __init__(self, total: int):
        self.total, self.start, self.drawn = total, time.perf_counter(), 0.0
        self.live = sys.stderr.isatty()

    def update(self, done: int, loss: float, force: bool = False):
        now = time.perf_counter()
        if not force and (not self.live or now - self.drawn < 0.1):
            return
        self.drawn = now
        width, frac = 30, done / max(self.total, 1)
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        rate = done / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} steps  loss {loss:.6g}  {rate:.1f} it/s")
        sys.stderr.flush()

    def close(self, done: int, loss: float):
        self.update(done, loss, force=True)
        sys.stderr.write("\n")
