"""Step-by-step progress on stderr: each long step prints when it starts and how long it took;
on a terminal an elapsed-time ticker runs while a step is busy."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, total_steps: int, stream: TextIO | None = None, quiet: bool = False):
        self.total = total_steps
        self.done = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.timings: dict[str, float] = {}

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
        if not self.quiet:
            print(f"{label} …", file=self.stream, flush=True)
        ticker = None
        if tty:
            def tick() -> None:
                while not stop.wait(1.0):
                    print(f"\r      {time.perf_counter() - start:6.0f} s", end="", file=self.stream, flush=True)
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
            self.timings[title] = elapsed
            if not self.quiet:
                status = "done" if sys.exc_info()[0] is None else "FAILED"
                print(f"      {status} in {elapsed:.1f} s", file=self.stream, flush=True)
