"""Step-by-step progress on stderr: each long step prints when it starts and how long it took;
on a terminal an elapsed-time ticker runs while a step is busy. A step that knows how much work it
has reports it with ``advance(done, total, unit)``: a count with the estimated time left, in the
ticker on a terminal, else a line at most every ``ADVANCE_EVERY`` seconds (and at the end)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

__all__ = ["Progress", "eta_text"]

ADVANCE_EVERY = 10.0  # seconds between count lines when stderr is not a terminal


def eta_text(done: int, total: int, elapsed: float) -> str:
    """``"12/53 samples, 40 s, ETA 2 min 17 s"``-style remainder estimate (no unit)."""
    if done <= 0 or done >= total:
        return f"{done}/{total}, {elapsed:.0f} s"
    left = elapsed / done * (total - done)
    left_text = f"{int(left // 60)} min {left % 60:.0f} s" if left >= 60 else f"{left:.0f} s"
    return f"{done}/{total}, {elapsed:.0f} s, ETA {left_text}"


class Progress:
    def __init__(self, total_steps: int, stream: TextIO | None = None, quiet: bool = False):
        self.total = total_steps
        self.done = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.timings: dict[str, float] = {}
        self._status = ""
        self._step_start = time.perf_counter()
        self._last_line = 0.0
        self._tty = False

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"      {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        label = f"[{self.done}/{self.total}] {title}"
        tty = not self.quiet and getattr(self.stream, "isatty", lambda: False)()
        stop = threading.Event()
        start = time.perf_counter()
        self._status, self._step_start, self._last_line, self._tty = "", start, start, tty
        if not self.quiet:
            print(f"{label} …", file=self.stream, flush=True)
        ticker = None
        if tty:
            def tick() -> None:
                while not stop.wait(1.0):
                    status = f"  {self._status}" if self._status else ""
                    print(f"\r      {time.perf_counter() - start:6.0f} s{status}\033[K", end="", file=self.stream,
                          flush=True)
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
                print("\r", end="", file=self.stream)
            elapsed = time.perf_counter() - start
            self._status = ""
            self.timings[title] = elapsed
            if not self.quiet:
                status = "done" if sys.exc_info()[0] is None else "FAILED"
                print(f"      {status} in {elapsed:.1f} s", file=self.stream, flush=True)

    def advance(self, done: int, total: int, unit: str = "") -> None:
        """Report ``done`` of ``total`` units of the running step, with the estimated time left."""
        now = time.perf_counter()
        text = eta_text(done, total, now - self._step_start)
        if unit:
            head, _, tail = text.partition(",")
            text = f"{head} {unit},{tail}"
        self._status = text
        if self.quiet or self._tty:
            return
        if done >= total or now - self._last_line >= ADVANCE_EVERY:
            self._last_line = now
            self.note(text)
