"""A jail child that misbehaves on request, for the pool's tests (DecodePool(child_args=[python, this file])).

It boots exactly as the real child (imports, sandbox, ready message: ``rksmolvlm.runtime.jail.child``),
then per task reads ``params["rogue"]`` and does what it names; without it, it answers as the real
child. ``params["sleep"]`` seconds are slept first in every mode (a slow decode).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import sys
import time

import numpy as np

from rksmolvlm.runtime.jail import child
from rksmolvlm.runtime.jail.wire import ok_answer

MODES = ("hang", "burn", "hog", "exit", "segv", "wrong_shape", "huge_shape", "wrong_dtype", "big_header", "pickle",
         "unknown_error", "wrong_family", "long_message", "nan", "truncated", "extra", "canned")


def main() -> int:
    booted = child.boot(sys.argv[1:])
    channel = booted.channel
    canned: dict[tuple, np.ndarray] = {}
    while True:
        task = child.read_task(channel)
        if task is None:
            return 0
        mode = task.params.get("rogue")
        time.sleep(float(task.params.get("sleep", 0)))
        if mode is None:
            child.reply(booted, task)
        elif mode == "hang":
            time.sleep(3600)
        elif mode == "burn":
            from rksmolvlm.runtime.jail import sandbox

            sandbox.set_task_cpu(task.cpu_s)
            while True:
                pass
        elif mode == "hog":
            child.reply(booted, task, _hog)
        elif mode == "exit":
            os._exit(3)
        elif mode == "segv":
            signal.raise_signal(signal.SIGSEGV)
        elif mode in ("wrong_shape", "huge_shape", "wrong_dtype", "truncated", "extra"):
            _tiles(channel, task, mode)
        elif mode == "big_header":
            channel.sock.sendall(struct.pack(">I", 10_000_000) + b"{" * 65536)
        elif mode == "pickle":
            raw = pickle.dumps({"ok": True, "result": {}, "arrays": []})
            channel.sock.sendall(struct.pack(">I", len(raw)) + raw)
        elif mode == "nan":
            raw = b'{"ok": true, "result": {"width": NaN, "height": 1}, "arrays": []}'
            channel.sock.sendall(struct.pack(">I", len(raw)) + raw)
        elif mode in ("unknown_error", "wrong_family", "long_message"):
            kind = {"unknown_error": "SystemExit", "wrong_family": "VideoTooLargeError"}.get(mode, "ImageError")
            message = "x" * 10_000 if mode == "long_message" else "no"
            _send(channel, {"ok": False, "error": {"type": kind, "message": message, "limit": None}})
        elif mode == "canned":  # a valid image.tile answer of zeros, made once: the wire's own cost
            settings = task.params["settings"]
            shape = tuple(task.params["shape"])
            if shape not in canned:
                canned[shape] = np.zeros(shape, np.uint8)
            rows, cols = task.params["rows"], task.params["cols"]
            assert settings["tile_size"] == shape[1]
            header, buffers = ok_answer({"rows": rows, "cols": cols}, [canned[shape]])
            channel.send(header, buffers)
        else:
            raise SystemExit(f"unknown rogue mode {mode!r}")


def _hog(op, params, payload, context):
    """Allocate (and touch) 16 MiB blocks until the address-space limit stops it."""
    blocks = []
    while True:
        blocks.append(np.ones(16 << 20, np.uint8))


def _tiles(channel, task, mode: str) -> None:
    tile = task.params["settings"]["tile_size"]
    shape = [1, tile, tile, 3]
    dtype = "uint8"
    if mode == "wrong_shape":
        shape = [1, tile + 1, tile, 3]
    elif mode == "huge_shape":
        shape = [1, 100_000, 100_000, 3]
    elif mode == "wrong_dtype":
        dtype = "float64"
    header = {"ok": True, "result": {"rows": 0, "cols": 0}, "arrays": [{"dtype": dtype, "shape": shape}]}
    if mode == "huge_shape":  # 30 GB declared, 64 KiB sent: the parent must refuse before reading
        _send(channel, header, b"\0" * 65536)
        time.sleep(3600)
    body = bytes(int(np.prod(shape)) * (8 if dtype == "float64" else 1))
    if mode == "truncated":
        _send(channel, header, body[:len(body) // 2])
        os._exit(0)
    _send(channel, header, body + (b"trailing" if mode == "extra" else b""))


def _send(channel, header: dict, body: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    channel.sock.sendall(struct.pack(">I", len(raw)) + raw + body)


if __name__ == "__main__":
    sys.exit(main())
