"""The jail's own failures: a decode that did not end as an answer (timeout, abort, crash, a child that
broke the protocol) or that could not start (no child free, pool closed). Each carries the ``op`` and a
message naming the limit it hit and the config key or action that changes it."""

from __future__ import annotations

from rksmolvlm.errors import RkSmolVLMError

__all__ = ["JailError", "JailTimeout", "JailAborted", "JailCrashed", "JailBusy", "JailProtocolError", "JailClosed"]


class JailError(RkSmolVLMError):
    """A decode in the jail that ended without an answer from the media's point of view."""

    def __init__(self, message: str, *, op: str):
        super().__init__(message)
        self.op = op


class JailTimeout(JailError):
    """The decode outlived its wall deadline: the child was killed."""

    def __init__(self, message: str, *, op: str, deadline_s: float):
        super().__init__(message, op=op)
        self.deadline_s = deadline_s


class JailAborted(JailError):
    """The caller gave up (its request ended) while waiting or decoding: the child, if any, was killed."""


class JailCrashed(JailError):
    """The child died while decoding: a signal (``signal``: "SIGXCPU" over its CPU time, "SIGKILL" from
    the OOM killer, "SIGSEGV" …) or an exit (``returncode``, the child's exit code; ``exit_code`` stays the
    CLI's)."""

    def __init__(self, message: str, *, op: str, signal: str | None = None, returncode: int | None = None):
        super().__init__(message, op=op)
        self.signal = signal
        self.returncode = returncode


class JailBusy(JailError):
    """No child was free within the deadline (every child busy, or none could be started)."""


class JailProtocolError(JailError):
    """The child's answer broke the protocol (shape, dtype, size, error type, framing): it was killed
    unread; treat the media as hostile."""


class JailClosed(JailError):
    """The pool was closed: no more decodes."""
