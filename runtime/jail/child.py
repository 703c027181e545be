"""A jail child: ``python -m rksmolvlm.runtime.jail.child --fd N --max-memory BYTES [--no-seccomp]``.

It imports what the ops need (numpy, Pillow and its decoders, PyAV, the processing modules) and warms
them on a tiny image, THEN applies the sandbox (limits and the seccomp filter, ``sandbox.py``), says it
is ready, and serves one task at a time over its socket until the parent closes it. The media's own
refusals are answered as their rksmolvlm.errors class; running out of the address-space limit as the
op's too-large error with limit "max_memory"; anything else as the op's base error. The parent starts
it with stdin/stdout (and stderr, unless RKSMOLVLM_JAIL_DEBUG=1) on /dev/null, cwd "/", no other fd; it
lowers its own priority (nice +5) so decodes never starve the server's threads.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rksmolvlm.errors import ImageDecodeTooLargeError, ImageError, VideoError, VideoTooLargeError

from . import ops, sandbox
from .wire import ERROR_TYPES, Channel, WireEOF, WireError, error_answer, ok_answer

__all__ = ["Booted", "Task", "main", "boot", "serve", "read_task", "reply"]

MAX_PAYLOAD = 1 << 31  # bytes of media in one task (the parent's own limits are far below)
NICE = 5  # decodes yield the CPU to the server's own threads (/health, the model worker's sampling)

Handler = Callable[[str, Mapping[str, Any], bytes, Mapping[str, Any]], tuple[dict, list]]


@dataclass
class Booted:
    """A child ready to serve: its channel to the parent, the sandbox it runs under, its arguments."""

    channel: Channel
    state: sandbox.SandboxState
    args: argparse.Namespace


@dataclass
class Task:
    op: str
    params: dict
    payload: bytes
    cpu_s: float | None


def main(argv: Sequence[str] | None = None) -> int:
    booted = boot(argv)
    serve(booted)
    return 0


def boot(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Booted:
    """Parse the arguments, import and warm the decoders, apply the sandbox, send the ready message."""
    parser = parser or argparse.ArgumentParser(prog="rksmolvlm.runtime.jail.child")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the parent")
    parser.add_argument("--max-memory", type=int, required=True, help="bytes of address space beyond the idle size")
    parser.add_argument("--no-seccomp", action="store_true", help="skip the seccomp filter (tests, diagnosis)")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    os.nice(NICE)
    _warm_up()
    state = sandbox.apply(args.max_memory, seccomp=not args.no_seccomp)
    channel = Channel(sock)
    channel.send({"ready": True, "pid": os.getpid(), "vm_size": state.idle_vm_size, "rss": sandbox.vm_rss(),
                  "as_limit": state.as_limit, "fsize_limit": state.fsize_limit, "seccomp": state.seccomp,
                  "no_network": state.no_network, "socket_errno": state.socket_errno})
    return Booted(channel, state, args)


def serve(booted: Booted, handler: Handler = ops.run) -> None:
    """Answer tasks one at a time until the parent closes the socket."""
    while True:
        task = read_task(booted.channel)
        if task is None:
            return
        reply(booted, task, handler)


def read_task(channel: Channel) -> Task | None:
    """The next task, or None when the parent closed the socket."""
    try:
        header = channel.read_header()
    except WireEOF as exc:
        if exc.got == 0:
            return None
        raise
    op, params, size, cpu_s = header.get("op"), header.get("params"), header.get("payload"), header.get("cpu_s")
    if not isinstance(op, str) or not isinstance(params, dict) or not isinstance(size, int) \
            or not 0 <= size <= MAX_PAYLOAD or not (cpu_s is None or isinstance(cpu_s, (int, float))):
        raise WireError(f"a task header with the wrong fields: {sorted(header)}")
    received = bytearray(size)
    channel.read_into(memoryview(received))
    payload = bytes(received)  # the decoders take bytes; the bytearray is freed on return
    return Task(op, params, payload, cpu_s)


def reply(booted: Booted, task: Task, handler: Handler = ops.run) -> None:
    """Run ``task`` under its CPU limit and send the answer (or the error it ended with)."""
    cpu_soft = sandbox.set_task_cpu(task.cpu_s)
    context = {**asdict(booted.state), "cpu_soft": cpu_soft}
    buffers: list = []
    try:
        result, arrays = handler(task.op, task.params, task.payload, context)
        task.payload = b""  # the media's memory back before the answer is built
        header, buffers = ok_answer(result, arrays)
        del arrays
    except Exception as exc:  # noqa: BLE001 - every failure of the media becomes a named answer
        task.payload = b""
        header = _error_header(task.op, exc, booted.args.max_memory)
    booted.channel.send(header, buffers)


# ==============================================================================================
# Private helpers
# ==============================================================================================
def _error_header(op: str, exc: BaseException, max_memory: int) -> dict:
    image = op.startswith("image.")
    what = "image" if image else "video"
    if _ran_out_of_memory(exc):  # Python's, or FFmpeg's ENOMEM (av.error.MemoryError is one too)
        too_large: type[ImageError] | type[VideoError] = ImageDecodeTooLargeError if image else VideoTooLargeError
        return error_answer(too_large.__name__, f"decoding the {what} needed more than the decoder's memory budget "
                            f"of {max_memory / 2**20:.0f} MiB: send a smaller {what}, or raise decode.max_memory",
                            "max_memory")
    if isinstance(exc, (ImageError, VideoError)) and type(exc).__name__ in ERROR_TYPES:
        return error_answer(type(exc).__name__, str(exc), getattr(exc, "limit", None))
    kind: type[ImageError] | type[VideoError] = ImageError if image else VideoError
    return error_answer(kind.__name__, f"the {what} could not be decoded ({type(exc).__name__}: {str(exc)[:300]})",
                        None)


def _ran_out_of_memory(exc: BaseException) -> bool:
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 16:  # load_image re-raises a MemoryError as its own error
        if isinstance(current, MemoryError):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _warm_up() -> None:
    """Import every decoder the ops reach and run the image path once, before the limits apply (their
    libraries' mappings then count in the idle size, not in the task's budget)."""
    import io

    import av
    import av.logging
    import numpy as np
    from PIL import Image

    from rksmolvlm.processing import image_safety, video, video_frames  # noqa: F401
    from rksmolvlm.processing.image import ImageSettings, image_size, load_image, tile_image

    av.logging.set_level(av.logging.PANIC)
    Image.init()  # every decoder plugin, with its C library
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(png, format="PNG")
    data = png.getvalue()
    image_size(data)
    tile_image(load_image(data), ImageSettings(tile_size=4, longest_edge=8))
    settings = video_frames.VideoSettings(fps=1.0, max_frames=1, longest_edge=8, frame_size=4)
    video_frames.resize_frames(np.zeros((1, 4, 6, 3), np.uint8), settings)


if __name__ == "__main__":
    sys.exit(main())
