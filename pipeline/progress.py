"""Progress for long work: a live bar with rate and ETA on a terminal, quiet log lines otherwise."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """`update(n)` as work completes. On a terminal: a tqdm bar. Elsewhere (CI, `ray job` logs):
    one line every `log_every` seconds and a last line at `close()`."""

    def __init__(self, total: int, desc: str, unit: str = "img", log_every: float = 10.0,
                 stream=None, initial: int = 0):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.log_every = total, desc, unit, log_every
        self.done = initial
        self._start = self._last_log = time.monotonic()
        self._initial = initial
        self._bar = None
        if self.stream.isatty():
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream,
                             dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = (self.done - self._initial) / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if remaining != float("inf") else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {self.done}/{self.total} ({pct:.1f}%) {rate:.0f} {self.unit}/s ETA {eta}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._log(time.monotonic())
