"""The librknnrt C double (tests/doubles/librknnrt/) from Python: compile it, write the model blobs it
loads (its own header format, see its README), compute the features its fixed linear map gives, and
read its call log. Used by tests/runtime/test_rknn_*.py."""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
from pathlib import Path

import numpy as np

from support import DOUBLES

SOURCE = DOUBLES / "librknnrt" / "rknn_double.c"
FLOAT32, FLOAT16, INT8, UINT8 = 0, 1, 2, 3
NHWC = 1
# int provider(void* userdata, const uint8_t* nhwc, uint32_t n_bytes, float* out, uint32_t n_out)
PROVIDER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_uint32,
                            ctypes.POINTER(ctypes.c_float), ctypes.c_uint32)


def compile_double(directory: Path) -> Path:
    path = directory / "librknnrt.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(path), str(SOURCE), "-lpthread"],
                   check=True)
    return path


def model_blob(height: int, width: int, tokens: int, hidden: int, *, out_type: int = FLOAT32,
               in_type: int = UINT8, w_stride: int | None = None, platform: str = "rk3588",
               payload: bytes = b"") -> bytes:
    """A vision.rknn the double loads: an 80-byte header (README.md), then ``payload`` (stand-in weights)."""
    head = struct.pack("<8sI4I2I3I2I16sI", b"RKNNDBL1", 1, 1, height, width, 3, in_type, NHWC, 1, tokens, hidden,
                       out_type, w_stride or width, platform.encode(), len(payload))
    return head + struct.pack("<I", _fnv1a(payload, _fnv1a(head))) + payload


def expected_features(tiles: np.ndarray, tokens: int, hidden: int, fp16: bool = False) -> np.ndarray:
    """The double's linear map of uint8 (N, H, W, 3) tiles → float32 (N, tokens, hidden)."""
    n, height, width, _ = tiles.shape
    rows = height // tokens
    sums = tiles.astype(np.int64).reshape(n, tokens, rows * width, 3).sum(axis=2)  # (N, T, 3)
    d, c = np.arange(hidden)[:, None], np.arange(3)[None, :]
    k = (d * 7 + c * 3) % 11 - 5  # (D, 3)
    acc = sums @ k.T  # exact int64
    out = (acc.astype(np.float64) / (rows * width * 255.0)).astype(np.float32)
    return out.astype(np.float16).astype(np.float32) if fp16 else out


class RknnDouble:
    """The double's control and inspection functions (``double_*``)."""

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        lib.double_calls_json.restype = lib.double_last_error.restype = ctypes.c_char_p
        lib.double_bytes_copied.restype = ctypes.c_ulonglong
        lib.double_set_output_provider.argtypes = [PROVIDER, ctypes.c_void_p]
        lib.double_set_soc.argtypes = [ctypes.c_char_p]
        lib.double_reset()

    def calls(self, fn: str | None = None) -> list[dict]:
        calls = json.loads(self.lib.double_calls_json())
        return [c for c in calls if fn is None or c["fn"] == fn]

    def last_error(self) -> str:
        return self.lib.double_last_error().decode()

    def bytes_copied(self) -> int:
        return int(self.lib.double_bytes_copied())

    def live(self) -> tuple[int, int]:
        """(contexts, tensor mems) not destroyed."""
        return self.lib.double_live_contexts(), self.lib.double_live_mems()

    def set_provider(self, callback) -> None:
        self.lib.double_set_output_provider(callback if callback is not None else PROVIDER(), None)


def _fnv1a(data: bytes, h: int = 2166136261) -> int:
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h
