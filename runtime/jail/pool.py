"""The parent side of the media jail: a pool of pre-forked decoder children (``child.py``).

Every decode of untrusted media runs in a child under hard limits (``sandbox.py``); the parent sends the
task, waits for the answer polling its deadline and ``aborted()`` every ``POLL_S``, and validates the
answer against what the op allows (``wire.check_answer``, ``ops.expected_shapes``) before reading a
byte of payload. Any overrun kills the child (SIGKILL), reaps it and starts a replacement in the
background; a child's op error comes back as the same rksmolvlm.errors class.

Lanes: ``reserved`` children serve only lane "worker" (the model worker's decodes, so the worker never
waits behind pre-queue checks); the others serve lane "check" and, when free, lane "worker" too. A
free child goes to a waiting "worker" call first, then to the waiting client served least recently
(FIFO within a client), so one client's burst cannot starve another's single task.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rksmolvlm.errors import ImageError, VideoError

from . import ops
from .errors import JailAborted, JailBusy, JailClosed, JailCrashed, JailError, JailProtocolError, JailTimeout
from .wire import ERROR_TYPES, Channel, WireEOF, WireError, check_answer, encode_header

__all__ = ["DecodePool", "Answer", "MIB", "POLL_S", "LANES"]

MIB = 1 << 20
POLL_S = 0.05  # how often a waiting call looks at its deadline and aborted()
LANES = ("check", "worker")
SPAWN_TIMEOUT_S = 60.0  # imports on a loaded board take seconds; past this the child is replaced
# FFmpeg decodes on a few threads, so CPU time may run ahead of the wall clock: without an explicit
# cpu_s a task gets this many CPU seconds per wall second of its deadline (the wall deadline still rules).
CPU_PER_WALL_S = 2.0
_SOCKET_BUFFER = 1 << 20  # fewer wake-ups for a 13 MB answer


@dataclass
class Answer:
    """An op's answer: its result fields and its arrays (uint8, shapes as the op allows)."""

    result: dict
    arrays: list[np.ndarray]


class DecodePool:
    """``workers`` decoder children, ``reserved`` of them for lane "worker". Thread-safe."""

    def __init__(self, workers: int = 3, max_memory: int = 768 * MIB, *, reserved: int = 1, respawn: bool = True,
                 child_args: Sequence[str] | None = None):
        if workers < 1 or not 0 <= reserved < workers:
            raise ValueError(f"decode.workers = {workers} with {reserved} reserved for the model worker: need at "
                             "least one child for the pre-queue checks (workers > reserved ≥ 0)")
        if max_memory < 16 * MIB:
            raise ValueError(f"decode.max_memory = {max_memory} bytes is below 16 MiB: no image decodes in that")
        self.workers = workers
        self.reserved = reserved
        self.max_memory = int(max_memory)
        self.respawn = respawn
        self._child_args = list(child_args) if child_args else _default_child_args()
        self._cond = threading.Condition()
        self._children: list[_Child] = []
        self._waiting: list[_Waiter] = []
        self._served: dict[Any, int] = {}  # client → the serial number of its last grant
        self._serial = 0
        self._spawned = 0
        self._killed: Counter[str] = Counter()
        self._failures = 0  # spawns in a row that never became ready
        self._last_spawn_error = ""
        self._started = False
        self._closed = False
        self._stop = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn every child now; returns once they are started (``wait_ready`` waits for their imports)."""
        with self._cond:
            if self._closed:
                raise JailClosed("the decode pool is closed: start a new one", op="start")
            if self._started:
                return
            self._started = True
        for slot in range(self.workers):
            self._launch("worker" if slot < self.reserved else "check")

    def wait_ready(self, timeout: float) -> bool:
        """True once every child has finished its imports and applied its sandbox (False at the timeout)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._closed and self._alive() < self.workers:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._closed

    def close(self) -> None:
        """Kill every child and reap it; later ``run`` calls raise JailClosed."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            children, self._children = self._children, []
            for child in children:
                child.state = "dead"
            self._cond.notify_all()
        for child in children:
            child.kill()
        for child in children:
            child.reap(2.0)

    def __enter__(self) -> DecodePool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- work --------------------------------------------------------------------------------

    def run(self, op: str, params: Mapping[str, Any], payload: bytes = b"", *, deadline_s: float,
            cpu_s: float | None = None, lane: str = "check", client: str | None = None,
            aborted: Callable[[], bool] = lambda: False) -> Answer:
        """Run ``op`` on ``payload`` in a child. The wait for a free child counts against ``deadline_s``.
        Raises the op's own rksmolvlm.errors class for media it refuses, else a JailError subclass."""
        start = time.monotonic()
        if lane not in LANES:
            raise ValueError(f"lane {lane!r}: use one of {', '.join(LANES)}")
        if not (math.isfinite(deadline_s) and deadline_s > 0):
            raise ValueError(f"deadline_s = {deadline_s!r} must be a positive number of seconds")
        if cpu_s is not None and not (math.isfinite(cpu_s) and cpu_s > 0):
            raise ValueError(f"cpu_s = {cpu_s!r} must be a positive number of seconds")
        prepared = ops.prepare(op, params)
        cpu = float(cpu_s) if cpu_s is not None else CPU_PER_WALL_S * deadline_s + 1.0
        task = {"op": op, "params": prepared, "payload": len(payload), "cpu_s": cpu}
        encode_header(task)  # a header over the limit is the caller's error, before any child is used
        deadline = start + deadline_s
        if not self._started:
            self.start()
        child = self._acquire(op, lane, client, deadline, deadline_s, aborted)
        return self._exchange(child, op, prepared, task, payload, deadline, deadline_s, cpu, aborted)

    def snapshot(self) -> dict:
        """For /health and /metrics: children configured, ready, busy; calls waiting; children spawned and
        killed (by reason); the memory cap; whether every ready child has the network closed."""
        with self._cond:
            ready = [c for c in self._children if c.state in ("idle", "busy")]
            return {"workers": self.workers, "alive": len(ready), "busy": sum(c.state == "busy" for c in ready),
                    "waiting": len(self._waiting), "spawned": self._spawned, "killed": dict(self._killed),
                    "max_memory": self.max_memory,
                    "no_network": bool(ready) and all(c.ready.get("no_network") is True for c in ready)}

    # -- private: getting a child ----------------------------------------------------------------

    def _acquire(self, op: str, lane: str, client: Any, deadline: float, deadline_s: float,
                 aborted: Callable[[], bool]) -> _Child:
        with self._cond:
            while True:
                if self._closed:
                    raise JailClosed("the decode pool is closed (the server is stopping)", op=op)
                child = self._idle_for(lane)
                if child is None:
                    break
                if self._healthy(child):
                    self._grant(child, client)
                    return child
            waiter = _Waiter(client, lane, self._next_serial())
            self._waiting.append(waiter)
            try:
                while waiter.child is None:
                    if self._closed:
                        raise JailClosed("the decode pool is closed (the server is stopping)", op=op)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        busy = sum(c.state == "busy" for c in self._children)
                        raise JailBusy(f"{op}: no decoder was free within the {deadline_s:g} s deadline ({busy} of "
                                       f"{self.workers} busy{self._spawn_note()}): retry later, or raise "
                                       "decode.workers", op=op)
                    self._cond.wait(min(POLL_S, left))
                    if waiter.child is None:
                        self._cond.release()
                        try:
                            stop = aborted()
                        finally:
                            self._cond.acquire()
                        if stop and waiter.child is None:
                            raise JailAborted(f"{op}: the request ended while waiting for a decoder", op=op)
                return waiter.child
            except BaseException:
                if waiter.child is not None:  # handed a child as we gave up (or aborted() raised): pass it on
                    self._release(waiter.child)
                raise
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _idle_for(self, lane: str) -> _Child | None:
        lanes = ("worker", "check") if lane == "worker" else ("check",)
        for wanted in lanes:
            for child in self._children:
                if child.state == "idle" and child.lane == wanted:
                    return child
        return None

    def _healthy(self, child: _Child) -> bool:
        """An idle child still alive and silent; else it is retired (lock held)."""
        if child.proc.poll() is not None:
            self._retire(child, "crash")
            return False
        if child.channel.pending() is not False:
            self._retire(child, "protocol")
            return False
        return True

    def _grant(self, child: _Child, client: Any) -> None:
        child.state = "busy"
        self._served[client] = self._next_serial()
        if len(self._served) > 4096:  # forget the clients served longest ago
            for key in sorted(self._served, key=self._served.__getitem__)[:2048]:
                del self._served[key]

    def _hand_over(self, child: _Child) -> None:
        """Give an idle child to the waiter whose turn it is (lock held)."""
        if child.state != "idle" or not self._waiting or not self._healthy(child):
            return
        eligible = [w for w in self._waiting if child.lane == "check" or w.lane == "worker"]
        first = [w for w in eligible if w.lane == "worker"] or eligible
        if not first:
            return
        waiter = min(first, key=lambda w: (self._served.get(w.client, -1), w.serial))
        self._waiting.remove(waiter)
        self._grant(child, waiter.client)
        waiter.child = child
        self._cond.notify_all()

    def _release(self, child: _Child) -> None:
        with self._cond:
            if child.state == "busy":
                child.state = "idle"
                self._hand_over(child)

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _alive(self) -> int:
        return sum(c.state in ("idle", "busy") for c in self._children)

    def _spawn_note(self) -> str:
        alive = self._alive()
        if alive == self.workers:
            return ""
        note = f"; {self.workers - alive} starting"
        return note + (f", last start failed: {self._last_spawn_error}" if self._last_spawn_error else "")

    # -- private: one task ---------------------------------------------------------------------

    def _exchange(self, child: _Child, op: str, prepared: dict, task: dict, payload: bytes, deadline: float,
                  deadline_s: float, cpu: float, aborted: Callable[[], bool]) -> Answer:
        def check() -> None:
            if self._closed:
                raise _Stop("closed")
            if aborted():
                raise _Stop("aborted")
            if time.monotonic() >= deadline:
                raise _Stop("timeout")

        answered = False
        try:
            child.channel.send(task, [payload] if payload else [], check)
            header = child.channel.read_header(check)
            answered = True
            answer = check_answer(header)
            if not answer.ok:
                cls = ERROR_TYPES[answer.error_type]
                if not issubclass(cls, ops.error_family(op)):
                    raise WireError(f"{op} answered a {answer.error_type}, which it cannot raise")
                if answer.limit == "max_memory":
                    self._retire(child, "memory")  # a fresh heap for the next task
                else:
                    self._release(child)
                raise cls(answer.message, limit=answer.limit)
            shapes = ops.expected_shapes(op, prepared, answer.result)
            if list(answer.shapes) != shapes:
                raise WireError(f"{op} declared arrays {list(answer.shapes)[:4]}, not the {shapes} it may answer")
            arrays = child.channel.read_arrays(shapes, check)
        except _Stop as stop:
            self._retire(child, stop.reason)
            raise self._stopped(stop.reason, op, deadline_s) from None
        except (WireError, ValueError, TypeError, KeyError, OSError) as exc:
            if self._closed:
                self._retire(child, "closed")
                raise self._stopped("closed", op, deadline_s) from None
            error = self._failure(child, exc, op, cpu, answered)  # reaps a dead child first: its status tells
            self._retire(child, "crash" if isinstance(error, JailCrashed) else "protocol")
            raise error from None
        except (ImageError, VideoError):
            raise  # the media's own refusal: the child was released (or retired) above
        except BaseException:  # aborted() raised, or KeyboardInterrupt: the child's state is unknown
            self._retire(child, "aborted")
            raise
        self._release(child)
        return Answer(answer.result, arrays)

    def _failure(self, child: _Child, exc: Exception, op: str, cpu: float, answered: bool) -> JailError:
        """What a child that ended a task without a valid answer did: crashed, or broke the protocol."""
        if isinstance(exc, WireEOF):
            died = child.reap(1.0)
            if exc.got == 0 and not answered or died is not None and died < 0:
                return self._crashed(child, op, cpu)
            return JailProtocolError(f"{op}: the decoder broke the protocol ({exc}): the media is treated as hostile",
                                     op=op)
        if isinstance(exc, OSError):  # the child went away while we wrote to it
            child.reap(1.0)
            return self._crashed(child, op, cpu, f" ({exc.strerror or exc})")
        return JailProtocolError(f"{op}: the decoder's answer broke the protocol ({exc}); it was killed unread: the "
                                 "media is treated as hostile", op=op)

    def _stopped(self, reason: str, op: str, deadline_s: float) -> JailError:
        if reason == "timeout":
            return JailTimeout(f"{op} did not finish within its {deadline_s:g} s deadline; the decoder was killed: "
                               "the media is too complex to decode in time (send smaller media or raise the "
                               "deadline)", op=op, deadline_s=deadline_s)
        if reason == "aborted":
            return JailAborted(f"{op}: the request ended while decoding; the decoder was killed", op=op)
        return JailClosed(f"{op}: the decode pool was closed while decoding (the server is stopping)", op=op)

    def _crashed(self, child: _Child, op: str, cpu: float, detail: str = "") -> JailCrashed:
        code = child.proc.returncode
        if code is None:
            return JailCrashed(f"{op}: the decoder closed its socket without answering{detail}: the media is treated "
                               "as hostile", op=op)
        if code >= 0:
            return JailCrashed(f"{op}: the decoder exited with code {code} without answering{detail}", op=op,
                               returncode=code)
        name = _signal_name(-code)
        if -code == signal.SIGXCPU:
            why = f"it used up its {cpu:g} s of CPU time: the media is too complex (send smaller media)"
        elif -code == signal.SIGKILL:
            why = (f"killed from outside (the kernel's OOM killer?): lower decode.max_memory "
                   f"({self.max_memory / MIB:.0f} MiB) × decode.workers or give the service more memory")
        else:
            why = "the media is malformed or hostile"
        return JailCrashed(f"{op}: the decoder died of {name}{detail}: {why}", op=op, signal=name)

    # -- private: children ---------------------------------------------------------------------

    def _launch(self, lane: str) -> None:
        """Start a child for ``lane`` and a thread that waits for its ready message."""
        try:
            child = _Child.spawn(lane, self._child_args, self.max_memory)
        except OSError as exc:
            with self._cond:
                self._last_spawn_error = f"cannot start the decoder: {exc}"
                self._failures += 1
            self._later(self._relaunch_after_failure, lane)
            return
        with self._cond:
            if self._closed:
                child.kill()
                child.reap(2.0)
                return
            self._spawned += 1
            self._children.append(child)
        self._later(self._await_ready, child)

    def _await_ready(self, child: _Child) -> None:
        end = time.monotonic() + SPAWN_TIMEOUT_S

        def check() -> None:
            if self._stop.is_set() or time.monotonic() > end:
                raise _Stop("start")

        try:
            header = child.channel.read_header(check)
            _check_ready(header, child.proc.pid)
        except (_Stop, WireError, OSError, ValueError) as exc:
            if self._stop.is_set():
                return
            if isinstance(exc, _Stop):
                reason = f"the decoder did not become ready within {SPAWN_TIMEOUT_S:g} s"
            elif isinstance(exc, WireEOF) and exc.got == 0:
                reason = "the decoder exited before it was ready"
            else:
                reason = f"the decoder's ready message was wrong ({exc})"
            status = child.reap(0.2)
            with self._cond:
                self._last_spawn_error = reason + (f" (exit status {status})" if status is not None else "") + \
                    " (RKSMOLVLM_JAIL_DEBUG=1 shows its stderr)"
                self._failures += 1
            self._retire(child, "start", respawn=False)
            self._relaunch_after_failure(child.lane)
            return
        with self._cond:
            if child.state != "starting":
                return
            child.ready = header
            child.state = "idle"
            self._failures = 0
            self._last_spawn_error = ""
            self._hand_over(child)
            self._cond.notify_all()

    def _relaunch_after_failure(self, lane: str) -> None:
        if not self.respawn:
            return
        delay = min(5.0, 0.1 * 2 ** min(self._failures, 6))
        if not self._stop.wait(delay):
            self._launch(lane)

    def _retire(self, child: _Child, reason: str, *, respawn: bool = True) -> None:
        """Kill ``child`` (it stops counting at once), count why; reap it and start its replacement in the
        background."""
        with self._cond:
            if child.state == "dead":
                return
            child.state = "dead"
            if child in self._children:
                self._children.remove(child)
            self._killed[reason] += 1
            self._cond.notify_all()
        child.kill()
        self._later(self._replace, child, respawn and self.respawn)

    def _replace(self, child: _Child, respawn: bool) -> None:
        child.reap(None)  # its memory is back before the replacement's counts
        if respawn and not self._stop.is_set():
            self._launch(child.lane)

    def _later(self, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=target, args=args, name="rksmolvlm-jail", daemon=True).start()


# ==============================================================================================
# Private helpers
# ==============================================================================================
_READY_KEYS = {"ready", "pid", "vm_size", "rss", "as_limit", "fsize_limit", "seccomp", "no_network", "socket_errno"}


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Waiter:
    client: Any
    lane: str
    serial: int
    child: _Child | None = None


@dataclass(eq=False)
class _Child:
    lane: str
    proc: subprocess.Popen
    channel: Channel
    state: str = "starting"  # starting → idle ⇄ busy → dead
    ready: dict = field(default_factory=dict)

    @classmethod
    def spawn(cls, lane: str, child_args: Sequence[str], max_memory: int) -> _Child:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (mine, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        debug = os.environ.get("RKSMOLVLM_JAIL_DEBUG") == "1"
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [*child_args, "--fd", str(theirs.fileno()), "--max-memory", str(max_memory)]
        try:
            proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=None if debug else subprocess.DEVNULL,
                                    cwd="/", env=env, start_new_session=True)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return cls(lane, proc, Channel(mine, 0.05))

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.channel.sock.close()
        except OSError:
            pass

    def reap(self, timeout: float | None) -> int | None:
        """The exit status (negative: the signal), or None when it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def _default_child_args() -> list[str]:
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # no cwd on sys.path (3.11+)
    return [sys.executable, *safe_path, "-m", "rksmolvlm.runtime.jail.child"]


def _check_ready(header: dict, pid: int) -> None:
    if header.get("ready") is not True or set(header) != _READY_KEYS:
        raise WireError(f"a ready message with the fields {sorted(map(str, header))[:12]}")
    if header["pid"] != pid:
        raise WireError(f"a ready message from pid {header['pid']!r}, not {pid}")
    if not isinstance(header["no_network"], bool) or not isinstance(header["seccomp"], str):
        raise WireError("a ready message with no_network/seccomp of the wrong type")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
