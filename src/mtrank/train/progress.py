"""Progress of long jobs, on a terminal and in a log.

On a terminal a job shows a tqdm bar; when stderr is a file or a pipe (a CI log, ``nohup``,
``| tee``) it prints plain lines instead: at most one every ``interval`` seconds while an
epoch runs (batches done, rows/s, ETA, running loss) and one when it ends, so a log never
stays silent for minutes. ``quiet`` silences both.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

LINE_INTERVAL_S = 10.0


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def log_line(message: str, *, quiet: bool = False, stream: TextIO | None = None) -> None:
    """Print one progress line to stderr (flushed at once), unless ``quiet``."""
    if not quiet:
        print(message, file=stream or sys.stderr, flush=True)


class EpochProgress:
    """Progress of one training epoch: a tqdm bar on a terminal, plain lines otherwise.

    Args:
        desc: the label, e.g. ``epoch 2/5``.
        total: batches in the epoch (0 or None when unknown, e.g. a stream).
        initial: batches already done (a resumed epoch).
        batch_size: rows per batch (for rows/s).
        quiet: print nothing.
        interval: seconds between two plain lines.
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        initial: int = 0,
        batch_size: int = 1,
        quiet: bool = False,
        interval: float = LINE_INTERVAL_S,
        stream: TextIO | None = None,
    ) -> None:
        self.desc, self.total, self.n = desc, total or None, initial
        self.batch_size, self.quiet, self.interval = batch_size, quiet, interval
        self.stream = stream or sys.stderr
        self.loss: float | None = None
        self._start = self._last = time.perf_counter()
        self._start_n = initial
        self._bar = None
        if not quiet and self.stream.isatty():
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="batch", leave=False, file=self.stream
            )

    def update(self, loss: float | None = None) -> None:
        """One batch done; ``loss`` is the running mean training loss."""
        self.n += 1
        if loss is not None:
            self.loss = loss
        if self._bar is not None:
            self._bar.update(1)
            if self.n % 20 == 0 and self.loss is not None:
                self._bar.set_postfix(loss=f"{self.loss:.4f}")
        elif not self.quiet and time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            log_line(self._status(), stream=self.stream)

    def _rate(self) -> float:
        """Rows per second since the epoch (or its resumption) started."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return (self.n - self._start_n) * self.batch_size / elapsed

    def _status(self) -> str:
        rate = self._rate()
        done = f"{self.n:,}/{self.total:,} batches" if self.total else f"{self.n:,} batches"
        parts = [f"{self.desc}: {done}", f"{rate:,.0f} rows/s"]
        if self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) * self.batch_size / rate)}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        return ", ".join(parts)

    def close(self) -> None:
        """The batches are done: close the bar (on a terminal)."""
        if self._bar is not None:
            self._bar.close()
        self._seconds = time.perf_counter() - self._start
        self._rows_per_s = self._rate()

    def report(self, summary: str = "") -> None:
        """Print the epoch's line (batches, time, rows/s and ``summary``) when not on a terminal."""
        if self._bar is not None or self.quiet:
            return
        seconds = getattr(self, "_seconds", time.perf_counter() - self._start)
        rate = getattr(self, "_rows_per_s", self._rate())
        line = f"{self.desc}: {self.n:,} batches in {_duration(seconds)} ({rate:,.0f} rows/s)"
        log_line(line + (f"; {summary}" if summary else ""), stream=self.stream)
