"""Bulk steps that hold the GIL for their whole length — parsing a multi-megabyte JSON body, decoding
its base64 — run one at a time across the request threads.

``json.loads`` of a 14 MB body holds the interpreter for about 25 ms and ``base64.b64decode`` of it
about as long; neither lets another thread in meanwhile. Six such requests at once stacked those
holds in front of the event loop and /health waited 179 ms. One at a time, the event loop waits for
at most one hold; the big requests wait for each other instead, a few tens of milliseconds each.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["BULK_BYTES", "bulk"]

BULK_BYTES = 256 * 1024  # below this a step holds the interpreter for well under a millisecond

_ONE_AT_A_TIME = threading.Lock()


@contextlib.contextmanager
def bulk(size: int) -> Iterator[None]:
    """Hold the bulk lock around a step over ``size`` bytes of input (small steps run at once)."""
    if size < BULK_BYTES:
        yield
        return
    with _ONE_AT_A_TIME:
        yield
