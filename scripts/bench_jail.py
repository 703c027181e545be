#!/usr/bin/env python3
"""What decoding in the jail costs a request, side by side in one run: the server's decoder
(runtime/jail/: a child process, the bytes sent over a socket, the tiles sent back) against the
in-process decoder the CLI uses, on the same images at SmolVLM-256M settings (longest edge 2048,
512² tiles), plus the pre-queue probe of each.

Prints per image: median ms of tile in process, tile in the jail, their ratio, the probe (header
open in a child), and whether the tiles are byte-identical.

    .venv/bin/python scripts/bench_jail.py [--repeats 7] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from bench_preprocess import _median_ms  # scripts/ is on sys.path when a script runs
from rksmolvlm.processing.content import ImagePart
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.runtime.decoding import InlineDecoder
from rksmolvlm.runtime.jail import DecodePool
from rksmolvlm.runtime.jail.decoder import JailedDecoder

SETTINGS = ImageSettings(tile_size=512, longest_edge=2048)
IMAGES = [("jpeg", 2048, 1536), ("jpeg", 1920, 1080), ("png", 640, 480)]


def _encoded(kind: str, width: int, height: int) -> bytes:
    rng = np.random.RandomState(width + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x ^ y) & 255], -1)
    image = Image.fromarray((base * 0.7 + rng.randint(0, 70, base.shape)).clip(0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG" if kind == "jpeg" else "PNG", **({"quality": 90} if kind == "jpeg" else {}))
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    pool = DecodePool(args.workers, reserved=1)
    started = time.perf_counter()
    pool.start()
    if not pool.wait_ready(120):
        raise SystemExit("the jail's children did not start: run with RKSMOLVLM_JAIL_DEBUG=1")
    ready_ms = (time.perf_counter() - started) * 1000
    jailed, inline = JailedDecoder(pool, image_timeout_s=120, probe_timeout_s=120), InlineDecoder()
    rows = []
    try:
        for kind, width, height in IMAGES:
            data = _encoded(kind, width, height)
            part = ImagePart(data)
            here = _median_ms(lambda: inline.tile(part, SETTINGS, DecodeLimits()), args.repeats)  # noqa: B023
            there = _median_ms(lambda: jailed.tile(part, SETTINGS, DecodeLimits()), args.repeats)  # noqa: B023
            probe = _median_ms(lambda: JailedDecoder(pool).inspect_image(data, DecodeLimits()),  # noqa: B023
                               args.repeats)  # a new decoder each time: nothing remembered
            same = np.array_equal(inline.tile(part, SETTINGS, DecodeLimits()).tiles,
                                  jailed.tile(part, SETTINGS, DecodeLimits()).tiles)
            tiles = inline.tile(part, SETTINGS, DecodeLimits()).count
            rows.append({"image": f"{kind} {width}×{height}", "bytes": len(data), "tiles": tiles,
                         "inline_ms": round(here, 1), "jail_ms": round(there, 1), "ratio": round(there / here, 2),
                         "probe_ms": round(probe, 1), "identical": same})
    finally:
        pool.close()
    if args.json:
        print(json.dumps({"spawn_to_ready_ms": round(ready_ms), "workers": args.workers, "rows": rows}))
        return 0
    print(f"{args.workers} children ready in {ready_ms:.0f} ms; median of {args.repeats} runs")
    print(f"{'image':<18}{'bytes':>10}{'tiles':>7}{'inline ms':>11}{'jail ms':>9}{'jail/inline':>13}"
          f"{'probe ms':>10}  identical")
    for row in rows:
        print(f"{row['image']:<18}{row['bytes']:>10,}{row['tiles']:>7}{row['inline_ms']:>11}{row['jail_ms']:>9}"
              f"{row['ratio']:>13}{row['probe_ms']:>10}  {row['identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
