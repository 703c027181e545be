"""The jail's framing, both directions: ``[u32 header length, big-endian][JSON header][raw payload]``.

Parent → child (a task): ``{"op", "params", "payload": n, "cpu_s"}`` then n bytes of media. Child →
parent (once, when ready): ``{"ready": true, ...}``; then per task an answer: ``{"ok": true, "result":
{...}, "arrays": [{"dtype": "uint8", "shape": [...]}]}`` followed by the arrays' bytes, or ``{"ok": false,
"error": {"type", "message", "limit"}}``. Never pickle: a compromised child must not run code in the
parent. ``check_answer`` validates a header's shape, dtypes and error type before the parent reads a
byte of payload; the op's own shape rules are ``ops.expected_shapes``.
"""

from __future__ import annotations

import inspect
import json
import math
import select
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rksmolvlm import errors

__all__ = ["MAX_HEADER", "MAX_MESSAGE", "ERROR_TYPES", "WireError", "WireEOF", "Channel", "WireAnswer",
           "encode_header", "decode_header", "check_answer", "ok_answer", "error_answer"]

MAX_HEADER = 64 * 1024  # a header is a few hundred bytes; 1,024 frame indices fit with room to spare
MAX_MESSAGE = 2000  # characters of an error message
ARRAY_DTYPES = ("uint8",)  # tiles and frames; nothing else ever crosses
# The only errors a child may name: the media's own refusals (rksmolvlm.errors' image and video errors).
ERROR_TYPES: dict[str, type[errors.ImageError] | type[errors.VideoError]] = {
    name: cls for name, cls in vars(errors).items()
    if inspect.isclass(cls) and issubclass(cls, (errors.ImageError, errors.VideoError))}


class WireError(ValueError):
    """A frame or header that breaks the protocol."""


class WireEOF(WireError):
    """The peer closed the socket; ``got`` bytes of the frame part being read had arrived (0: at a boundary)."""

    def __init__(self, message: str, got: int):
        super().__init__(message)
        self.got = got


@dataclass(frozen=True)
class WireAnswer:
    """A validated answer header: ``shapes`` of the arrays that follow, or the error fields."""

    ok: bool
    result: dict = field(default_factory=dict)
    shapes: tuple[tuple[int, ...], ...] = ()
    error_type: str = ""
    message: str = ""
    limit: str | None = None


class Channel:
    """One end of a socketpair. ``check`` (parent side) is called before every chunk and at least every
    ``poll_s`` while waiting, and stops the exchange by raising; without it (child side) calls block."""

    def __init__(self, sock: socket.socket, poll_s: float | None = None):
        self.sock = sock
        self.poll_s = poll_s
        sock.settimeout(poll_s)

    def send(self, header: dict, buffers: Sequence[bytes | memoryview] = (),
             check: Callable[[], None] | None = None) -> None:
        raw = encode_header(header)
        for part in (struct.pack(">I", len(raw)) + raw, *buffers):
            view = memoryview(part).cast("B")
            while view.nbytes:
                if check is not None:
                    check()
                try:
                    sent = self.sock.send(view)
                except TimeoutError:
                    continue
                view = view[sent:]

    def read_header(self, check: Callable[[], None] | None = None) -> dict:
        """The next header; WireError when its length is over MAX_HEADER (nothing more is read) or it
        is not a JSON object."""
        prefix = bytearray(4)
        self.read_into(memoryview(prefix), check)
        size = struct.unpack(">I", prefix)[0]
        if size > MAX_HEADER:
            raise WireError(f"a header of {size:,} bytes, over the {MAX_HEADER:,}-byte limit")
        raw = bytearray(size)
        try:
            self.read_into(memoryview(raw), check)
        except WireEOF as exc:
            raise WireEOF(f"the peer closed the socket inside a header ({exc.got} of {size} bytes)", 4 + exc.got) \
                from None
        return decode_header(bytes(raw))

    def read_into(self, view: memoryview, check: Callable[[], None] | None = None) -> None:
        """Fill ``view`` exactly; WireEOF (with the count read) when the peer closes first."""
        view = view.cast("B")
        got, size = 0, view.nbytes
        while got < size:
            if check is not None:
                check()
            try:
                n = self.sock.recv_into(view[got:], size - got)
            except TimeoutError:
                continue
            if n == 0:
                raise WireEOF(f"the peer closed the socket after {got} of {size} bytes", got)
            got += n

    def read_arrays(self, shapes: Sequence[tuple[int, ...]], check: Callable[[], None] | None = None
                    ) -> list[np.ndarray]:
        """uint8 arrays of exactly these (already validated) shapes, read straight into place."""
        out = []
        for shape in shapes:
            array = np.empty(shape, np.uint8)
            if array.size:
                self.read_into(array.reshape(-1).data, check)
            out.append(array)
        return out

    def pending(self) -> bool | None:
        """True when unread bytes wait (a child that said more than its answer), None at EOF."""
        try:
            if not select.select([self.sock], [], [], 0)[0]:  # a timeout socket's recv would wait first
                return False
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, TimeoutError, InterruptedError):
            return False
        except (OSError, ValueError):
            return None
        return True if data else None


def encode_header(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_HEADER:
        raise WireError(f"a header of {len(raw):,} bytes, over the {MAX_HEADER:,}-byte limit: send fewer frame "
                        "indices per call")
    return raw


def decode_header(raw: bytes) -> dict:
    """A JSON object, strictly: UTF-8, no NaN/Infinity, no repeated keys."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"a header that is not strict JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise WireError(f"a header that is a JSON {type(header).__name__}, not an object")
    return header


def check_answer(header: dict) -> WireAnswer:
    """The answer's fields, or WireError naming what is wrong. Array shapes are checked for form here
    (non-negative ints, dtype in the allowlist) and against the op by ``ops.expected_shapes``."""
    ok = header.get("ok")
    if ok is True:
        _keys(header, {"ok", "result", "arrays"}, "an answer")
        result, arrays = header["result"], header["arrays"]
        if not isinstance(result, dict):
            raise WireError("an answer whose result is not an object")
        if not isinstance(arrays, list) or len(arrays) > 4:
            raise WireError("an answer whose arrays are not a list of at most 4")
        shapes = []
        for decl in arrays:
            if not isinstance(decl, dict):
                raise WireError("an array declaration that is not an object")
            _keys(decl, {"dtype", "shape"}, "an array declaration")
            if decl["dtype"] not in ARRAY_DTYPES:
                raise WireError(f"an array of dtype {str(decl['dtype'])[:40]!r} (only {', '.join(ARRAY_DTYPES)})")
            shape = decl["shape"]
            if not isinstance(shape, list) or len(shape) > 8 or not all(_natural(d) for d in shape):
                raise WireError(f"an array shape that is not a list of at most 8 whole numbers ≥ 0: {str(shape)[:80]}")
            shapes.append(tuple(shape))
        return WireAnswer(True, result=result, shapes=tuple(shapes))
    if ok is False:
        _keys(header, {"ok", "error"}, "an error answer")
        error = header["error"]
        if not isinstance(error, dict):
            raise WireError("an error answer whose error is not an object")
        _keys(error, {"type", "message", "limit"}, "an error")
        kind, message, limit = error["type"], error["message"], error["limit"]
        if not isinstance(kind, str) or kind not in ERROR_TYPES:
            raise WireError(f"an error of type {str(kind)[:60]!r}, not one of the media errors")
        if not isinstance(message, str) or len(message) > MAX_MESSAGE:
            raise WireError(f"an error message that is not a string of at most {MAX_MESSAGE} characters")
        if limit is not None and not (isinstance(limit, str) and limit.isidentifier() and len(limit) <= 64):
            raise WireError("an error limit that is not a field name")
        return WireAnswer(False, error_type=kind, message=message, limit=limit)
    raise WireError("a header without \"ok\": true or false")


def ok_answer(result: dict, arrays: Sequence[np.ndarray] = ()) -> tuple[dict, list[memoryview]]:
    """The header and buffers of a result (child side); arrays are sent C-contiguous as uint8."""
    contiguous = [np.ascontiguousarray(a, dtype=np.uint8) for a in arrays]
    header = {"ok": True, "result": result,
              "arrays": [{"dtype": "uint8", "shape": [int(d) for d in a.shape]} for a in contiguous]}
    return header, [a.reshape(-1).data for a in contiguous if a.size]


def error_answer(kind: str, message: str, limit: str | None) -> dict:
    """The header of an error answer (child side); the message is cut to MAX_MESSAGE."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 1] + "…"
    return {"ok": False, "error": {"type": kind, "message": message, "limit": limit}}


# ==============================================================================================
# Private helpers
# ==============================================================================================
def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("repeated keys")
    return out


def _keys(obj: dict, want: set[str], what: str) -> None:
    if set(obj) != want:
        raise WireError(f"{what} with keys {sorted(map(str, obj))[:8]}, not {sorted(want)}")


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def finite_number(value) -> bool:
    """An int or a finite float, not a bool (answers' numeric fields)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value)))
