"""Issue 21's hostile media (tests/support/hostile_media.py, made here, never stored) against the
in-process decoders: each is refused with a named error (class, code, limit) within a bounded time,
before the costly step; the slow cases run the real-size bombs in a child process under an address-space
limit and bound its peak memory (VmHWM), and check the decode-memory formula against what Pillow
really allocates."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import hostile_media as hm
from rksmolvlm.errors import (ImageDecodeTooLargeError, ImageError, ImageTooComplexError, VideoTooComplexError,
                              VideoTooLargeError)
from rksmolvlm.processing.image import load_image
from rksmolvlm.processing.image_safety import DecodeLimits, check_jpeg, decode_bytes, tiff_strips
from rksmolvlm.processing.video import MAX_VIDEO_STREAMS, VideoLimits, VideoReader, probe_video

pytest.importorskip("av")

TESTS = Path(__file__).resolve().parents[1]


def refused(call, error: type, code: str, limit: str | None, seconds: float):
    """Run ``call``, expect ``error`` with ``code`` and ``limit`` within ``seconds``; the error."""
    start = time.monotonic()
    with pytest.raises(error) as caught:
        call()
    took = time.monotonic() - start
    assert caught.value.code == code
    assert caught.value.limit == limit
    assert took < seconds, f"refused after {took:.2f} s"
    return caught.value


# -- video ---------------------------------------------------------------------------------------


def test_many_video_tracks_are_refused_before_any_is_decoded():
    data = hm.multi_track_mkv(16)
    error = refused(lambda: probe_video(data), VideoTooComplexError, "video_too_complex", None, 2.0)
    assert "16 video streams" in str(error) and f"{MAX_VIDEO_STREAMS} allowed" in str(error)


def test_a_second_video_track_is_not_probed_and_does_not_change_the_result():
    one = hm.multi_track_mkv(1, 640, 360, frames=6)
    two = hm.multi_track_mkv(2, 640, 360, frames=6)
    assert probe_video(two) == probe_video(one)
    with VideoReader(one) as a, VideoReader(two) as b:
        assert np.array_equal(a.read_frames([0, 5]), b.read_frames([0, 5]))


@pytest.mark.parametrize("tracks", [1, 3])
def test_an_edit_list_repeating_the_packets_is_refused_before_opening(tracks):
    data = hm.edit_list_mp4(100_000, tracks=tracks)
    error = refused(lambda: probe_video(data), VideoTooComplexError, "video_too_complex", "max_stream_frames", 2.0)
    assert "100000 times" in str(error)


def test_an_edit_list_within_the_frame_limit_is_read_as_ffmpeg_expands_it():
    info = probe_video(hm.edit_list_mp4(3, frames=10))
    assert info.total_num_frames == 30  # the repeats are frames to torchcodec too
    refused(lambda: probe_video(hm.edit_list_mp4(3, frames=10), VideoLimits(max_stream_frames=29)),
            VideoTooComplexError, "video_too_complex", "max_stream_frames", 2.0)


def test_a_single_edit_is_never_counted():
    assert probe_video(hm.edit_list_mp4(1, frames=10), VideoLimits(max_stream_frames=10)).total_num_frames == 10


def test_a_frame_growing_mid_stream_is_refused_by_max_side_before_conversion(monkeypatch):
    data = hm.size_switch_mkv(frames=30)
    info = probe_video(data)
    assert (info.width, info.height, info.total_num_frames) == (640, 360, 31)  # the header hides it
    converted = []
    convert = VideoReader._convert
    monkeypatch.setattr(VideoReader, "_convert",
                        lambda self, frame, out: (converted.append(frame.width), convert(self, frame, out)))
    with VideoReader(data) as reader:
        assert reader.read_frames([10]).shape == (1, 360, 640, 3)  # (frames near the end drain with the big one)
        error = refused(lambda: reader.read_frames([30]), VideoTooLargeError, "video_too_large", "max_side", 3.0)
    assert "8192x4320" in str(error)
    assert converted == [640]


def test_the_pixel_limit_also_applies_to_every_decoded_frame():
    data = hm.size_switch_mkv(frames=30, big=(1280, 720))
    with VideoReader(data, VideoLimits(max_frame_pixels=640 * 360)) as reader:
        refused(lambda: reader.read_frames([30]), VideoTooLargeError, "video_too_large", "max_frame_pixels", 3.0)


def test_a_long_gop_read_is_refused_from_the_keyframe_index_before_decoding(monkeypatch):
    data = hm.long_gop_webm(640, 360, frames=300)
    decoded = []
    next_decoded = VideoReader._next_decoded
    monkeypatch.setattr(VideoReader, "_next_decoded", lambda self: decoded.append(1) or next_decoded(self))
    limits = VideoLimits(max_decoded_pixels=200 * 640 * 360)
    with VideoReader(data, limits) as reader:
        assert reader.info.total_num_frames == 300
        before = len(decoded)
        assert reader._planned_decodes([0, 150, 299]) == 300  # one keyframe: everything up to the last
        error = refused(lambda: reader.read_frames([0, 150, 299]), VideoTooComplexError, "video_too_complex",
                        "max_decoded_pixels", 0.5)
        assert len(decoded) == before  # nothing decoded for the refused read
        assert reader.read_frames([0, 100]).shape == (2, 360, 640, 3)  # 101 decodes: within the limit
    assert "300 frames" in str(error)


def test_planned_decodes_follow_the_seek_rule():
    data = hm.long_gop_webm(640, 360, frames=40)
    with VideoReader(data) as reader:
        assert reader._planned_decodes([39]) == 40
        reader.read_frames([20])
        assert reader._planned_decodes([39]) == 19  # continues from frame 20
        assert reader._planned_decodes([10]) == 11  # backwards: from the keyframe (frame 0)


# -- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strips", [100_000, 1_300_000])
def test_a_tiff_with_too_many_strips_is_refused_from_its_directory(strips):
    data = hm.strip_bomb_tiff(strips)
    assert tiff_strips(data) == (strips, strips)
    error = refused(lambda: load_image(data), ImageTooComplexError, "image_too_complex", "max_tiff_strips", 2.0)
    assert f"{strips:,} strips" in str(error)


def test_overlapping_jpeg_strips_are_refused_without_walking_them():
    data = hm.strip_bomb_tiff(20_000)
    error = refused(lambda: load_image(data), ImageTooComplexError, "image_too_complex", "max_tiff_strips", 1.0)
    assert "overlap" in str(error)
    # the strip limit is a DecodeLimits field
    refused(lambda: load_image(hm.strip_bomb_tiff(300, overlap=False), limits=DecodeLimits(max_tiff_strips=299)),
            ImageTooComplexError, "image_too_complex", "max_tiff_strips", 1.0)


def test_tiff_strips_reads_only_the_directory():
    buffer = io.BytesIO()
    Image.new("L", (32, 64)).save(buffer, "TIFF", compression="jpeg", strip_size=32 * 8)
    assert tiff_strips(buffer.getvalue()) == (8, 8)
    assert load_image(buffer.getvalue()).size == (32, 64)  # a real multi-strip JPEG TIFF still loads
    assert tiff_strips(b"\x89PNG\r\n\x1a\n") is None
    assert tiff_strips(b"II*\x00\xff\xff\xff\x00") is None  # directory out of the file


@pytest.mark.parametrize("lossless", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_webp_canvas_is_costed_at_what_libwebp_allocates(lossless):
    data = hm.webp_canvas(7071, lossless=lossless)
    assert len(data) < 200_000
    error = refused(lambda: load_image(data), ImageDecodeTooLargeError, "image_decode_too_large",
                    "max_decode_bytes", 1.0)
    assert f"{decode_bytes('RGBA', (7071, 7071), image_format='WEBP') / 2**20:,.0f} MiB" in str(error)
    # 16 bytes a pixel whatever the mode and libwebp's 8 MiB of state, the resizer's tables, and the band work
    # of compositing alpha
    assert decode_bytes("RGB", (1000, 1000), image_format="WEBP") == 16 * 1000 * 1000 + 8 * 2**20 + 48 * 2000
    assert decode_bytes("RGBA", (1000, 1000), image_format="WEBP") == \
        16 * 1000 * 1000 + 8 * 2**20 + 48 * 2000 + 24 * 2**20


def test_avif_is_not_opened():
    data = hm.avif_canvas(256)
    if data is None:
        pytest.skip("this Pillow cannot write AVIF")
    with pytest.raises(ImageError) as caught:
        load_image(data)
    assert caught.value.code == "invalid_image"


@pytest.mark.parametrize("make", [hm.apng_frames, hm.gif_frames])
def test_animated_canvases_decode_only_the_first_frame_and_count_a_second_canvas(make):
    data = make(2000, 1024)
    start = time.monotonic()
    image = load_image(data)
    assert image.size == (1024, 1024) and time.monotonic() - start < 2.0
    with Image.open(io.BytesIO(data)) as opened:
        mode = opened.mode
    assert decode_bytes(mode, (1024, 1024), animated=True) == decode_bytes(mode, (1024, 1024)) + 1024 * 1024
    refused(lambda: load_image(data, limits=DecodeLimits(max_decode_bytes=decode_bytes(mode, (1024, 1024)))),
            ImageDecodeTooLargeError, "image_decode_too_large", "max_decode_bytes", 1.0)


@pytest.mark.parametrize("make, words", [
    (hm.jpeg_12bit, "12-bit"), (hm.jpeg_arithmetic, "arithmetic-coded"),
    (lambda: hm.jpeg_arithmetic(progressive=True), "arithmetic-coded progressive")])
def test_12_bit_and_arithmetic_jpeg_are_refused_by_name_before_opening(make, words, monkeypatch):
    data = make()
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("opened"))
    error = refused(lambda: load_image(data), ImageError, "invalid_image", None, 0.5)
    assert words in str(error)


def test_baseline_and_progressive_jpeg_still_pass_the_frame_check():
    for progressive in (False, True):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (1, 2, 3)).save(buffer, "JPEG", progressive=progressive)
        jpeg = check_jpeg(buffer.getvalue(), DecodeLimits())
        assert jpeg.precision == 8 and jpeg.sof == (0xC2 if progressive else 0xC0)
        assert load_image(buffer.getvalue()).size == (64, 48)


# -- real-size bombs in a child process ------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, {tests!r})
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from support import hostile_media as hm
    from rksmolvlm.processing.image import load_image
    from rksmolvlm.processing.video import probe_video, VideoReader
    data = {make}
    def status(key):
        return [int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith(key)][0]
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
    base = status("VmRSS")
    start = time.monotonic()
    try:
        {call}
        outcome = {{"ok": True}}
    except Exception as exc:
        outcome = {{"error": type(exc).__name__, "code": getattr(exc, "code", None),
                    "limit": getattr(exc, "limit", None)}}
    outcome["seconds"] = time.monotonic() - start
    outcome["peak_mb"] = status("VmHWM") - base  # above the process before the call
    print(json.dumps(outcome))
""")


def run_child(make: str, call: str, limit_gb: float = 2.0, timeout: float = 120.0) -> dict:
    code = _CHILD.format(tests=str(TESTS), limit=int(limit_gb * 2**30), make=make, call=call)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("make, call, error, code, limit, seconds, peak_mb", [
    # before: 5.7 GB and 21.9 s in the probe
    ("hm.multi_track_mkv(48)", "probe_video(data)", "VideoTooComplexError", "video_too_complex", None, 2.0, 200),
    # before: 1.4 s / 751 MB (100,000 repeats of 300 frames)
    ("hm.edit_list_mp4(100_000, frames=300, tracks=3)", "probe_video(data)", "VideoTooComplexError",
     "video_too_complex", "max_stream_frames", 2.0, 200),
    # before: over 100 s (killed), ≈ 43 min by the count
    ("hm.strip_bomb_tiff(1_300_000)", "load_image(data)", "ImageTooComplexError", "image_too_complex",
     "max_tiff_strips", 3.0, 200),
    # before: accepted, 825 MB peak against a 512 MiB budget
    ("hm.webp_canvas(7071)", "load_image(data)", "ImageDecodeTooLargeError", "image_decode_too_large",
     "max_decode_bytes", 2.0, 200),
])
def test_real_size_bombs_are_refused_with_bounded_memory(make, call, error, code, limit, seconds, peak_mb):
    outcome = run_child(make, call)
    assert (outcome.get("error"), outcome.get("code"), outcome.get("limit")) == (error, code, limit), outcome
    assert outcome["seconds"] < seconds, outcome
    assert outcome["peak_mb"] < peak_mb, outcome


@pytest.mark.slow
def test_allowed_video_tracks_cost_one_probe():
    """Four 4K tracks (the most allowed): the others are not decoded by the probe (528 MB before)."""
    outcome = run_child("hm.multi_track_mkv(4)", "probe_video(data)")
    assert outcome.get("ok"), outcome
    assert outcome["peak_mb"] < 300, outcome


@pytest.mark.slow
@pytest.mark.parametrize("make, mode, size, animated", [
    ("hm.webp_canvas(3000)", "RGBA", (3000, 3000), False),
    ("hm.webp_canvas(3000, lossless=False, mode='RGB')", "RGB", (3000, 3000), False),
    ("hm.apng_frames(500, 3000)", "L", (3000, 3000), True),
    ("hm.gif_frames(500, 3000)", "P", (3000, 3000), True),
])
def test_decode_bytes_bounds_what_load_image_really_allocates(make, mode, size, animated):
    fmt = "WEBP" if "webp" in make else None
    estimate_mb = decode_bytes(mode, size, image_format=fmt, animated=animated) / 2**20
    outcome = run_child(make, "load_image(data)")
    assert outcome.get("ok"), outcome
    assert outcome["peak_mb"] <= estimate_mb, (outcome, estimate_mb)
    assert outcome["peak_mb"] >= 0.6 * estimate_mb, (outcome, estimate_mb)  # nor wildly over
