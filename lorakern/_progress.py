"""Progress of fit(progress=True) on stderr."""
from __future__ import annotations

import sys
import time

#: off a terminal, a line at every tenth of the steps, and at least this often (seconds)
LOG_INTERVAL = 30.0


def eta_text(seconds: float) -> str:
    """A time left in words: "42 s", "3 min 5 s", "2 h 10 min"."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """On a terminal, a one-line bar redrawn in place at most 10 times a second. Elsewhere
    (a log file, a pipe, CI) whole lines, which a log keeps: one at every tenth of the steps
    and at least every LOG_INTERVAL seconds, each with the rate and the time left (ETA), and
    a last one at the end."""

    def __init__(self, total: int, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.start = total, time.perf_counter()
        self.drawn = self.start
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tenth = 0  # off a terminal: the last tenth of the steps a line was written for

    def _numbers(self, done: int, loss: float, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = eta_text(left) if left != float("inf") else "?"
        return (f"{done}/{self.total} steps  loss {loss:.6g}  {rate:.1f} it/s  "
                f"ETA {eta}  ({eta_text(elapsed)} so far)")

    def update(self, done: int, loss: float, force: bool = False):
        now = time.perf_counter()
        if self.live:
            if not force and self.drawn != self.start and now - self.drawn < 0.1:
                return
            self.drawn = now
            width, frac = 30, done / max(self.total, 1)
            bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
            self.stream.write(f"\r[{bar}] " + self._numbers(done, loss, now))
            self.stream.flush()
            return
        tenth = done * 10 // max(self.total, 1)
        if done < self.total and (force or tenth > self.tenth or now - self.drawn >= LOG_INTERVAL):
            self.tenth, self.drawn = max(tenth, self.tenth), now
            pct = 100 * done // max(self.total, 1)
            self.stream.write(f"fit {pct:3d}%  " + self._numbers(done, loss, now) + "\n")
            self.stream.flush()

    def close(self, done: int, loss: float, status: str = "completed"):
        """The last line; ``status`` is the FitResult's: a fit that ended early (converged,
        stopped, interrupted, diverged) says so instead of "done"."""
        if self.live:
            self.update(done, loss, force=True)
            self.stream.write("\n" if status == "completed" else f"  ({status})\n")
        else:
            now = time.perf_counter()
            word = "done" if status == "completed" else status
            self.stream.write(f"fit {word}  {done}/{self.total} steps  loss {loss:.6g}  "
                              f"in {eta_text(now - self.start)}\n")
        self.stream.flush()
