"""torch's antialiased Lanczos-3 resize of uint8 images, byte for byte, in numpy.

SmolVLM2's video processor resizes frames with torchvision v2 ``resize(..., LANCZOS, antialias=True)``
on a uint8 tensor, which runs ``torch._C._nn._upsample_lanczos2d_aa`` (torch >= 2.14). On uint8 that
kernel is integer arithmetic, so it can be reproduced exactly:

- per axis, Pillow-style antialias weights (support 3·scale when shrinking, 3 when enlarging; the
  filter sinc(x)·sinc(x/3) on [−3, 3)), computed in float64 with ``sin`` and normalised per output;
- the weights rounded (half away from zero) to int16 at a per-axis precision p: the first p for
  which 2·max_weight·2^p would reach 2^15, at most 22;
- a horizontal pass (width), its result rounded to uint8, then a vertical pass (height); an axis
  whose size does not change is not filtered at all, and an unchanged image is returned as is;
- each output = ``clip((Σ w·x + 2^(p−1)) >> p, 0, 255)``.

torch's AVX512, AVX2 and generic (ATEN_CPU_CAPABILITY=default, what non-x86 CPUs run) kernels give the
same bytes, except the generic one on an output one pixel wide whose height changes (a torch bug; no
video frame is one pixel wide). This is NOT Pillow's LANCZOS (Pillow keeps 22-bit int32 weights): on
video frames the two differ by 1 on ~0.2–0.5 % of the pixels.

The sums are BLAS matrix products over dense blocks of the banded weight matrix, in float32 where every
partial sum provably stays an integer below 2^24 (directly, or on inputs centred by −128), else in
float64: either way BLAS returns the exact integer sums in any summation order (see ``_arithmetic``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

import numpy as np

__all__ = ["resize_uint8", "resize_uint8_chain"]

_Float: TypeAlias = type[np.float32] | type[np.float64]  # the dtype of the exact sums (see _arithmetic)

_SUPPORT = 3.0  # Lanczos-3: the filter is zero outside [-3, 3)
_CHUNK_BYTES = 4 << 20  # float working set converted at once (fits a big L2/L3 cache)


def resize_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 RGB frames, (H, W, C) or (N, H, W, C), to (height, width) exactly as torchvision
    v2 ``resize(x, [height, width], InterpolationMode.LANCZOS, antialias=True)`` does on the
    (N, C, H, W) uint8 tensor. Returns a new uint8 array of the same rank (the input itself when
    the size is unchanged, as torchvision does)."""
    return resize_uint8_chain(frames, [(height, width)])


def resize_uint8_chain(frames: np.ndarray, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """``resize_uint8`` to each (height, width) of ``sizes`` in turn (each result rounded to uint8, as
    separate torchvision calls), without leaving the working layout in between."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"resize_uint8 takes uint8 frames, got {frames.dtype}: convert the decoded frames to uint8 RGB")
    if frames.ndim not in (3, 4):
        raise ValueError(f"resize_uint8 takes (H, W, C) or (N, H, W, C) frames, got shape {frames.shape}")
    sizes = [(int(h), int(w)) for h, w in sizes]
    for h, w in sizes:
        if h < 1 or w < 1:
            raise ValueError(f"resize_uint8: an output size must be at least 1x1, got {h}x{w}")
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    n, h, w, c = batch.shape
    if h < 1 or w < 1 or c < 1:
        raise ValueError(f"resize_uint8: empty frames of shape {frames.shape}")
    if all(size == (h, w) for size in sizes):
        return frames
    if n == 0:
        return np.empty((*frames.shape[:-3], *sizes[-1], c), np.uint8)
    # Working layout (H, N, C, W): the width pass filters the last axis of (H·N·C, W) rows and the
    # height pass the first axis of (H, N·C·W) columns, both as one matrix product per block.
    planes = np.ascontiguousarray(batch.transpose(1, 0, 3, 2))
    for height, width in sizes:
        if w != width:
            planes = _filter_rows(planes.reshape(h * n * c, w), _axis_plan(w, width)).reshape(h, n, c, width)
            w = width
        if h != height:
            planes = _filter_columns(planes.reshape(h, n * c * w), _axis_plan(h, height)).reshape(height, n, c, w)
            h = height
    out = np.ascontiguousarray(planes.transpose(1, 0, 3, 2))
    return out[0] if single else out


# --- the weights ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Block:
    """Outputs [o0, o1) read inputs [lo, hi); ``matrix`` is (hi − lo, o1 − o0) holding the int16 weights · 2^−p."""

    o0: int
    o1: int
    lo: int
    hi: int
    matrix: np.ndarray


@dataclass(frozen=True)
class _AxisPlan:
    """One axis: torch's int16 weights and how to sum them exactly (see _arithmetic)."""

    in_size: int
    out_size: int
    xmin: np.ndarray  # first input of each output
    xsize: np.ndarray  # inputs of each output
    weights: np.ndarray  # (out, taps) int16
    precision: int
    dtype: _Float
    shift: int  # subtracted from the uint8 inputs before the sums (0 or 128)
    offset: np.ndarray  # (out,) added to the scaled sums before the floor
    row_blocks: tuple[_Block, ...]  # for filtering the last axis (width)
    column_blocks: tuple[_Block, ...]  # for filtering the first axis (height)


def _lanczos(x: float) -> float:
    # sinc(x)·sinc(x/3) on [-3, 3), as torch's (and Pillow's) lanczos filter; math.sin is the C library's sin
    if -_SUPPORT <= x < _SUPPORT:
        return _sinc(x) * _sinc(x / 3.0)
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@lru_cache(maxsize=64)
def _axis_plan(in_size: int, out_size: int) -> _AxisPlan:
    """Weights and block layout for resizing one axis from in_size to out_size (cached: every frame of a
    video shares them)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"axis sizes must be at least 1, got {in_size} -> {out_size}")
    scale = in_size / out_size  # align_corners=False, no scale factor given: input / output as double
    support = _SUPPORT * scale if scale >= 1.0 else _SUPPORT
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = math.ceil(support) * 2 + 1
    xmin = np.zeros(out_size, np.int64)
    xsize = np.zeros(out_size, np.int64)
    wts = np.zeros((out_size, max_taps), np.float64)
    wt_max = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as the C++ cast
        size = min(int(center + support + 0.5), in_size) - lo
        size = min(max(size, 0), max_taps)
        row = [_lanczos((j + lo - center + 0.5) * invscale) for j in range(size)]
        total = 0.0
        for v in row:
            total += v
        if total != 0.0:
            row = [v / total for v in row]
            wt_max = max([wt_max, *row])
        xmin[i], xsize[i] = lo, size
        wts[i, :size] = row
    precision = 0
    while precision < 22:
        if int(0.5 + wt_max * (1 << (precision + 1))) >= (1 << 15):
            break
        precision += 1
    scaled = wts * float(1 << precision)
    # round half away from zero, then the C cast to int (truncation) and to int16
    ints = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    ints = ((ints + (1 << 15)) % (1 << 16) - (1 << 15)).astype(np.int16)
    dtype, shift, offset = _arithmetic(ints, precision)
    # Outputs per block: dense blocks of the banded matrix waste (block·scale + taps)/taps multiplies, small
    # blocks cost a call each. Measured: ~32 outputs when enlarging and ~16 at 1/4 for the width pass (its
    # products are chunk-rows tall), 8 for the height pass (its products are a whole row of frames wide).
    row_step = int(min(32, max(12, round(32 / math.sqrt(max(scale, 1.0))))))
    rows = _blocks(xmin, xsize, ints, precision, dtype, row_step)
    columns = _blocks(xmin, xsize, ints, precision, dtype, 8)
    return _AxisPlan(in_size, out_size, xmin, xsize, ints, precision, dtype, shift, offset, rows, columns)


def _arithmetic(ints: np.ndarray, precision: int) -> tuple[_Float, int, np.ndarray]:
    """How to get ``(Σ w·x + 2^(p−1)) >> p`` exactly from BLAS: (dtype, shift, offset). The matrices hold
    w·2^−p (a power-of-two scaling changes no mantissa), so the result is ``floor(Σ w·2^−p·(x − shift) +
    offset)`` with offset = (shift·Σw + 2^(p−1))·2^−p, clipped to [0, 255]. float32 adds integers exactly below
    2^24:

    - shift 0 when every partial sum is below 2^24 (|Σ| <= 255·Σ|w|): enlarging and mild shrinking;
    - shift 128 when 128·Σ|w| is below 2^24 and p <= 16: the centred sums are exact, and a final value whose
      true result is not clipped is an integer below 256·2^p <= 2^24, so adding the offset is exact; a true
      result at or beyond 2^24 (or below 0) rounds to a value that clips the same way;
    - float64 otherwise (every sum here is far below 2^53).
    """
    wide = ints.astype(np.int64)
    abs_sum = int(np.abs(wide).sum(axis=1).max())
    row_sum = wide.sum(axis=1)
    half = 1 << (precision - 1) if precision > 0 else 0
    unit = 1.0 / (1 << precision)
    dtype: _Float
    if 255 * abs_sum + half < (1 << 24):
        dtype, shift = np.float32, 0
    elif 128 * abs_sum < (1 << 24) and precision <= 16 and int(np.abs(128 * row_sum + half).max()) < (1 << 24):
        dtype, shift = np.float32, 128
    else:
        dtype, shift = np.float64, 0
    offset = ((shift * row_sum + half) * unit).astype(dtype)
    return dtype, shift, offset


def _blocks(xmin: np.ndarray, xsize: np.ndarray, ints: np.ndarray, precision: int, dtype: _Float,
            step: int) -> tuple[_Block, ...]:
    unit = 1.0 / (1 << precision)  # scaling by a power of two keeps every product and sum exact
    blocks = []
    for o0 in range(0, len(xmin), step):
        o1 = min(o0 + step, len(xmin))
        lo = int(xmin[o0:o1].min())
        hi = max(int((xmin[o0:o1] + xsize[o0:o1]).max()), lo + 1)
        matrix = np.zeros((hi - lo, o1 - o0), dtype)
        for o in range(o0, o1):
            k = int(xsize[o])
            matrix[xmin[o] - lo: xmin[o] - lo + k, o - o0] = ints[o, :k] * unit
        blocks.append(_Block(o0, o1, lo, hi, matrix))
    return tuple(blocks)


# --- the passes -------------------------------------------------------------------------------------------------------

def _load(x: np.ndarray, plan: _AxisPlan) -> np.ndarray:
    if plan.shift:
        return np.subtract(x, plan.shift, dtype=plan.dtype)
    return x.astype(plan.dtype)


def _filter_rows(x: np.ndarray, plan: _AxisPlan) -> np.ndarray:
    """(R, in) uint8 → (R, out) uint8, filtering along the last axis: per chunk of rows, every block's input
    columns times its weights give its output columns."""
    rows = x.shape[0]
    out = np.empty((rows, plan.out_size), np.uint8)
    chunk = max(1, _CHUNK_BYTES // (np.dtype(plan.dtype).itemsize * plan.in_size))
    acc: np.ndarray = np.empty((min(chunk, rows), plan.out_size), plan.dtype)
    for r0 in range(0, rows, chunk):
        xf = _load(x[r0:r0 + chunk], plan)
        part = acc[:len(xf)]
        for b in plan.row_blocks:
            np.matmul(xf[:, b.lo:b.hi], b.matrix, out=part[:, b.o0:b.o1])
        part += plan.offset
        np.clip(part, 0, 255, out=out[r0:r0 + chunk], casting="unsafe")  # the truncating cast is the floor
    return out


def _filter_columns(x: np.ndarray, plan: _AxisPlan) -> np.ndarray:
    """(in, K) uint8 → (out, K) uint8, filtering along the first axis: per block, its input rows (contiguous)
    times its weights give its output rows."""
    cols = x.shape[1]
    out = np.empty((plan.out_size, cols), np.uint8)
    window = max(b.hi - b.lo for b in plan.column_blocks)
    chunk = max(1, _CHUNK_BYTES // (np.dtype(plan.dtype).itemsize * window))
    offset = plan.offset[:, None]
    for c0 in range(0, cols, chunk):
        for b in plan.column_blocks:
            acc = b.matrix.T @ _load(x[b.lo:b.hi, c0:c0 + chunk], plan)
            acc += offset[b.o0:b.o1]
            np.clip(acc, 0, 255, out=out[b.o0:b.o1, c0:c0 + chunk], casting="unsafe")
    return out
