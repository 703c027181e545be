"""A compromised child cannot harm the parent through its answers: every header is validated (shape,
dtype, size, error type, message, strict JSON, never pickle) before a byte of payload is read; a
violation is a JailProtocolError, the child is killed, the parent's memory does not move and the pool
serves the next call."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rksmolvlm.processing.image import ImageSettings, load_image, tile_image
from rksmolvlm.runtime.jail import MIB, DecodePool, JailProtocolError
from rksmolvlm.runtime.jail.sandbox import vm_rss
from rksmolvlm.runtime.jail.wire import MAX_HEADER, WireError, check_answer, decode_header

ROGUE = [sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "rogue_child.py")]
SETTINGS = ImageSettings(tile_size=32, longest_edge=64).to_dict()
HOSTILE = ["wrong_shape", "huge_shape", "wrong_dtype", "big_header", "pickle", "unknown_error", "wrong_family",
           "long_message", "nan", "truncated"]


@pytest.fixture(scope="module")
def pool():
    with DecodePool(workers=2, reserved=0, max_memory=128 * MIB, child_args=ROGUE) as pool:
        assert pool.wait_ready(60)
        yield pool


def live(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("mode", HOSTILE)
def test_a_hostile_answer_is_refused_unread_and_the_child_killed(pool, mode):
    assert pool.wait_ready(30)
    pids = {pool.run("diagnose", {}, deadline_s=5, lane=lane).result["pid"] for lane in ("check", "worker")}
    killed = pool.snapshot()["killed"].get("protocol", 0)
    before = vm_rss()
    start = time.monotonic()
    with pytest.raises(JailProtocolError) as refused:
        pool.run("image.tile", {"rogue": mode, "settings": SETTINGS}, b"x", deadline_s=10)
    took = time.monotonic() - start
    grown = vm_rss() - before
    assert refused.value.op == "image.tile" and "hostile" in str(refused.value)
    assert took < 2, took  # refused on the header, not at the deadline
    assert grown < 4 * MIB, f"the parent grew by {grown / MIB:.1f} MiB"
    assert pool.snapshot()["killed"].get("protocol", 0) == killed + 1
    time.sleep(0.1)
    assert sum(live(pid) for pid in pids) == len(pids) - 1  # the one that answered is gone
    answer = pool.run("image.tile", {"settings": SETTINGS}, _png(), deadline_s=10)  # the pool still serves
    assert np.array_equal(answer.arrays[0], tile_image(load_image(_png()), ImageSettings.from_dict(SETTINGS)).tiles)


def test_bytes_after_an_answer_retire_the_child_before_its_next_task():
    with DecodePool(workers=1, reserved=0, max_memory=128 * MIB, child_args=ROGUE) as pool:
        assert pool.wait_ready(60)
        first = pool.run("diagnose", {}, deadline_s=5).result["pid"]
        pool.run("image.tile", {"rogue": "extra", "settings": SETTINGS}, b"x", deadline_s=10)  # a valid answer
        second = pool.run("diagnose", {}, deadline_s=10).result["pid"]  # served by a fresh child
        assert second != first and pool.snapshot()["killed"] == {"protocol": 1}


@pytest.mark.parametrize("header,problem", [
    ({"ok": True, "result": {}, "arrays": [{"dtype": "object", "shape": [1]}]}, "dtype"),
    ({"ok": True, "result": {}, "arrays": [{"dtype": "uint8", "shape": [-1, 2]}]}, "shape"),
    ({"ok": True, "result": {}, "arrays": [{"dtype": "uint8", "shape": [True]}]}, "shape"),
    ({"ok": True, "result": {}, "arrays": [{"dtype": "uint8", "shape": [2], "offset": 0}]}, "keys"),
    ({"ok": True, "result": [], "arrays": []}, "result"),
    ({"ok": True, "result": {}, "arrays": [], "more": 1}, "keys"),
    ({"ok": 1, "result": {}, "arrays": []}, "ok"),
    ({"ok": False, "error": {"type": "ImageError", "message": "m", "limit": "x;y"}}, "limit"),
    ({"ok": False, "error": {"type": "RkSmolVLMError", "message": "m", "limit": None}}, "type"),
    ({"ok": False, "error": {"type": "ImageError", "message": 5, "limit": None}}, "message"),
])
def test_answer_headers_are_checked_field_by_field(header, problem):
    with pytest.raises(WireError, match=problem):
        check_answer(header)


def test_headers_are_strict_json_objects():
    for raw in (b'{"a": 1, "a": 2}', b'{"a": NaN}', b"[1]", b"\x80\x04}q\x00.", b"[" * 100_000, b"\xff"):
        with pytest.raises(WireError):
            decode_header(raw)
    assert MAX_HEADER == 64 * 1024


def test_a_valid_answer_is_read_into_arrays_of_the_declared_shape():
    import socket

    from rksmolvlm.runtime.jail.wire import Channel, ok_answer

    a, b = socket.socketpair()
    with a, b:
        tiles = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
        header, buffers = ok_answer({"rows": 0, "cols": 0}, [tiles])
        Channel(a).send(header, buffers)
        reader = Channel(b, 0.05)
        answer = check_answer(reader.read_header())
        assert answer.shapes == ((2, 4, 4, 3),)
        assert np.array_equal(reader.read_arrays(answer.shapes)[0], tiles)
        assert reader.pending() is False


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def test_the_rogue_child_is_a_real_separate_process(pool):
    assert pool.run("diagnose", {}, deadline_s=5).result["pid"] != os.getpid()
