"""What the jail costs, measured and printed (run with -s): a child's idle memory, spawn-to-ready, the
round trip of a 17-tile 512² answer (≈ 13 MB), and image.tile of a 1920×1080 JPEG through the jail
against in-process. The bounds asserted are loose (a shared 2-core machine); the numbers are the point."""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rksmolvlm.processing.image import ImageSettings, load_image, tile_image
from rksmolvlm.runtime.jail import MIB, DecodePool
from rksmolvlm.runtime.jail.sandbox import vm_rss, vm_size
from support.images import rng_image

ROGUE = [sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "rogue_child.py")]
pytestmark = pytest.mark.slow


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("workers", [1, 3])
def test_idle_child_memory_and_spawn_to_ready(workers):
    start = time.monotonic()
    with DecodePool(workers=workers, reserved=1 if workers > 1 else 0) as pool:
        assert pool.wait_ready(60)
        ready = time.monotonic() - start
        pid = pool.run("diagnose", {}, deadline_s=5).result["pid"]
        rss, size = vm_rss(pid), vm_size(pid)
    print(f"\n{workers} children: spawn-to-ready {ready * 1000:.0f} ms; idle child RSS {rss / MIB:.1f} MiB, VmSize "
          f"{size / MIB:.1f} MiB")
    assert rss < 150 * MIB and ready < 20


def test_round_trip_of_a_17_tile_512_answer():
    settings = ImageSettings(tile_size=512, longest_edge=2048).to_dict()
    params = {"rogue": "canned", "settings": settings, "shape": [17, 512, 512, 3], "rows": 4, "cols": 4}
    with DecodePool(workers=1, reserved=0, child_args=ROGUE) as pool:
        assert pool.wait_ready(60)
        pool.run("image.tile", params, b"x", deadline_s=10)
        took = median_time(lambda: pool.run("image.tile", params, b"x", deadline_s=10), 9)
    size = 17 * 512 * 512 * 3
    print(f"\n17×512² tiles ({size / 1e6:.1f} MB) round trip: {took * 1000:.1f} ms median "
          f"({size / took / 1e9:.2f} GB/s)")
    assert took < 1.0


def test_image_tile_through_the_jail_against_in_process():
    out = io.BytesIO()
    rng_image(1920, 1080, seed=11).save(out, format="JPEG", quality=90)
    data = out.getvalue()
    settings = ImageSettings(tile_size=512, longest_edge=2048)
    with DecodePool(workers=1, reserved=0) as pool:
        assert pool.wait_ready(60)
        jailed = pool.run("image.tile", {"settings": settings.to_dict()}, data, deadline_s=30)
        local = tile_image(load_image(data), settings)
        assert np.array_equal(jailed.arrays[0], local.tiles)
        inline_runs, jailed_runs = [], []
        for _ in range(9):  # interleaved: the machine's load drifts
            inline_runs.append(median_time(lambda: tile_image(load_image(data), settings), 1))
            jailed_runs.append(median_time(
                lambda: pool.run("image.tile", {"settings": settings.to_dict()}, data, deadline_s=30), 1))
        inline, through = statistics.median(inline_runs), statistics.median(jailed_runs)
    print(f"\n1920×1080 JPEG ({len(data) / 1e6:.2f} MB) → {local.count} tiles: in-process {inline * 1000:.1f} ms, "
          f"jailed {through * 1000:.1f} ms, overhead {(through - inline) * 1000:.1f} ms "
          f"({(through / inline - 1) * 100:.0f} %)")
    assert through < inline * 2 + 0.1
