"""What zero-copy memory saves per tile, measured on the librknnrt double at the 256M geometry (512²
uint8 tile, 64 × 576 float32 features), with the double's map switched off so only the I/O is timed.

Three ways to run one tile, bytes moved by the CPU outside the network (the double counts its own
copies; the Python side's are counted here) and wall time per tile:
- ``rknnlite``: what an RKNNLite-style wrapper does: rknn_inputs_set (the runtime copies the tile),
  rknn_outputs_get with a buffer the runtime allocates (it writes the floats), a copy into numpy,
  rknn_outputs_release, and the final np.stack of the tiles' features;
- ``copy``: RknnRuntimeVisionEncoder(zero_copy=False): rknn_inputs_set from the tile itself,
  rknn_outputs_get straight into the result array (is_prealloc);
- ``zero_copy``: RknnRuntimeVisionEncoder(): the tile written once into the runtime's input memory,
  the features converted by the runtime into its output memory and copied into the result array.
Run with ``-s`` to see the table."""

import ctypes
import shutil
import time

import numpy as np
import pytest

from support.rknn_double import RknnDouble, compile_double, model_blob

from rksmolvlm.runtime import rknn_abi as A
from rksmolvlm.runtime.npu_engines import RknnRuntimeVisionEncoder

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

SIDE, TOKENS, HIDDEN, TILES = 512, 64, 576, 26  # 26: a 5×5 split plus the global image
TILE_BYTES, FEATURE_BYTES = SIDE * SIDE * 3, TOKENS * HIDDEN * 4


def rknnlite_style(lib, ctx, tiles) -> tuple[np.ndarray, int]:
    """(features, bytes copied on the Python side)."""
    results, copied = [], 0
    for tile in tiles:
        inputs = A.Input(index=0, buf=tile.ctypes.data, size=tile.nbytes, type=A.TENSOR_UINT8, fmt=A.FORMAT_NHWC)
        assert lib.rknn_inputs_set(ctx, 1, ctypes.byref(inputs)) == 0
        assert lib.rknn_run(ctx, None) == 0
        output = A.Output(want_float=1)
        assert lib.rknn_outputs_get(ctx, 1, ctypes.byref(output), None) == 0
        results.append(np.ctypeslib.as_array(ctypes.cast(output.buf, ctypes.POINTER(ctypes.c_float)),
                                             shape=(TOKENS, HIDDEN)).copy())
        copied += FEATURE_BYTES
        assert lib.rknn_outputs_release(ctx, 1, ctypes.byref(output)) == 0
    stacked = np.stack(results)
    return stacked, copied + stacked.nbytes


def test_copy_saved_per_tile(tmp_path):
    library = compile_double(tmp_path)
    double = RknnDouble(library)
    double.lib.double_set_compute(0)
    model = tmp_path / "vision.rknn"
    model.write_bytes(model_blob(SIDE, SIDE, TOKENS, HIDDEN))
    tiles = np.random.RandomState(0).randint(0, 256, (TILES, SIDE, SIDE, 3)).astype(np.uint8)
    rows = {}

    raw = RknnRuntimeVisionEncoder(model, [1], library, zero_copy=False)  # borrow its context for the raw calls
    ctx = raw._cores[0].ctx
    rknnlite_style(double.lib, ctx, tiles[:2])  # warm-up
    best, moved = float("inf"), 0
    for _ in range(5):
        before = double.bytes_copied()
        start = time.perf_counter()
        _, python = rknnlite_style(double.lib, ctx, tiles)
        best = min(best, time.perf_counter() - start)
        moved = double.bytes_copied() - before + python
    rows["rknnlite"] = (moved / TILES, best / TILES)
    raw.close()

    for name, zero_copy in (("copy", False), ("zero_copy", True)):
        encoder = RknnRuntimeVisionEncoder(model, [1], library, zero_copy=zero_copy)
        encoder.encode(tiles[:2])
        best = float("inf")
        for _ in range(5):
            before = double.bytes_copied()
            start = time.perf_counter()
            encoder.encode(tiles)
            best = min(best, time.perf_counter() - start)
            runtime = double.bytes_copied() - before
        python = (TILE_BYTES + FEATURE_BYTES) * TILES if zero_copy else 0  # np.copyto in, np.copyto out
        rows[name] = ((runtime + python) / TILES, best / TILES)
        encoder.close()

    print(f"\nper {SIDE}² tile ({TOKENS}×{HIDDEN} float32 features), I/O only:")
    for name, (moved, seconds) in rows.items():
        print(f"  {name:10s} {moved:>10,.0f} bytes moved  {seconds * 1e6:8.1f} µs")
    # the bytes are exact: input once in every path; the output once more per extra copy
    assert rows["rknnlite"][0] == TILE_BYTES + 3 * FEATURE_BYTES
    assert rows["copy"][0] == TILE_BYTES + FEATURE_BYTES
    assert rows["zero_copy"][0] == TILE_BYTES + 2 * FEATURE_BYTES
    assert double.live() == (0, 0)
