"""The media jail: every decode of untrusted media (image and video, probe and pixels) runs in a child
process with hard limits (address space, CPU time, wall deadline, no network, no exec) and answers only
bounded arrays or a named error (DESIGN.md §11, issue 21 item 1).

``DecodePool`` (``pool.py``) is the parent side; ``child.py`` the child's main; ``sandbox.py`` what the
child applies to itself; ``wire.py`` the framing; ``ops.py`` what a child can be asked to do (``OPS``)."""

from .errors import JailAborted, JailBusy, JailClosed, JailCrashed, JailError, JailProtocolError, JailTimeout
from .ops import OPS
from .pool import MIB, Answer, DecodePool

__all__ = ["DecodePool", "Answer", "MIB", "OPS", "JailError", "JailTimeout", "JailAborted", "JailCrashed",
           "JailBusy", "JailProtocolError", "JailClosed"]
