#!/usr/bin/env python3
"""Benchmark rksmolvlm's image preprocessing against transformers' Idefics3 image processor (PIL
backend, the byte-exact reference) on the same images, in one run, SmolVLM-256M settings
(longest edge 2048, 512² tiles).

Prints per image size: median ms of transformers (float pixel_values), ours as the board runs it
(uint8 NHWC tiles for the RKNN model), ours with float normalization (the host preview), the speed-up
ratios and the max-abs difference of the float outputs (0 = byte-identical).

    .venv/bin/python scripts/bench_preprocess.py [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from PIL import Image

SIZES = [(2048, 1536), (1920, 1080), (640, 480)]


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.RandomState(width + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x ^ y) & 255], -1)
    return Image.fromarray((base * 0.7 + rng.randint(0, 70, base.shape)).clip(0, 255).astype(np.uint8))


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from transformers import Idefics3ImageProcessorPil

    from rksmolvlm.processing.image import ImageSettings, normalize, tile_image

    processor = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    settings = ImageSettings(tile_size=512, longest_edge=2048)
    rows = []
    for width, height in SIZES:
        image = _image(width, height)
        reference = processor(images=[[image]], return_tensors="np")["pixel_values"][0]
        ours = normalize(tile_image(image, settings).tiles, settings)
        diff = float(np.max(np.abs(ours - reference))) if ours.shape == reference.shape else float("inf")
        t_ref = _median_ms(lambda image=image: processor(images=[[image]], return_tensors="np"), args.repeats)
        t_board = _median_ms(lambda image=image: tile_image(image, settings), args.repeats)
        t_float = _median_ms(lambda image=image: normalize(tile_image(image, settings).tiles, settings), args.repeats)
        rows.append({"size": f"{width}x{height}", "tiles": int(reference.shape[0]), "transformers_ms": t_ref,
                     "ours_uint8_ms": t_board, "ours_float_ms": t_float, "speedup_uint8": t_ref / t_board,
                     "speedup_float": t_ref / t_float, "max_abs_diff": diff,
                     "byte_identical": ours.tobytes() == reference.tobytes()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'image':>10} {'tiles':>5} {'transformers ms':>16} {'ours uint8 ms':>14} {'×':>6} {'ours float ms':>14} "
          f"{'×':>6} {'max-abs':>8} {'identical':>9}")
    for r in rows:
        print(f"{r['size']:>10} {r['tiles']:>5} {r['transformers_ms']:16.1f} {r['ours_uint8_ms']:14.1f} "
              f"{r['speedup_uint8']:6.2f} {r['ours_float_ms']:14.1f} {r['speedup_float']:6.2f} "
              f"{r['max_abs_diff']:8.1g} {str(r['byte_identical']):>9}")


if __name__ == "__main__":
    main()
