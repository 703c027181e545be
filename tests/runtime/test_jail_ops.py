"""The jail's ops answer exactly what the in-process functions give (tiles, sizes, video metadata and
frames byte for byte), the media's own refusals come back as the same rksmolvlm.errors class, and a decode
over the child's memory budget ends as a named error in the child, not as growth of the parent."""

from __future__ import annotations

import io
from dataclasses import asdict

import numpy as np
import pytest

from rksmolvlm.errors import ImageDecodeTooLargeError, ImageError, ImageTooComplexError, ImageTooManyPixelsError
from rksmolvlm.processing.image import ImageSettings, image_size, load_image, tile_image
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.runtime.jail import MIB, DecodePool
from rksmolvlm.runtime.jail.sandbox import vm_rss
from support.images import rng_image

SETTINGS = ImageSettings(tile_size=64, longest_edge=192)


@pytest.fixture(scope="module")
def pool():
    with DecodePool(workers=2, reserved=1, max_memory=256 * MIB) as pool:
        assert pool.wait_ready(60)
        yield pool


def encoded(image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def tiny_mp4(frames: int = 12, width: int = 96, height: int = 64, flat: bool = False, **options: str) -> bytes:
    """An H.264 MP4 made in memory: moving gradients (or flat grey levels), one keyframe every 4 frames."""
    av = pytest.importorskip("av")
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "4", "bf": "1", **options}
        y, x = np.mgrid[0:height, 0:width] if not flat else (0, 0)
        for i in range(frames):
            rgb = np.full((height, width, 3), i * 40) if flat else \
                np.stack([(x * 3 + i * 20) % 256, (y * 4 + i * 10) % 256, (x + y + i * 30) % 256], -1)
            frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("fmt,size,mode", [("PNG", (300, 170), "RGB"), ("JPEG", (257, 401), "RGB"),
                                           ("PNG", (90, 60), "RGBA"), ("WEBP", (200, 200), "RGB")])
def test_tiles_are_byte_equal_to_tile_image_of_load_image(pool, fmt, size, mode):
    data = encoded(rng_image(*size, mode=mode, seed=3), fmt)
    answer = pool.run("image.tile", {"settings": SETTINGS.to_dict()}, data, deadline_s=20)
    want = tile_image(load_image(data), SETTINGS)
    assert answer.result == {"rows": want.rows, "cols": want.cols}
    assert len(answer.arrays) == 1 and answer.arrays[0].dtype == np.uint8
    assert np.array_equal(answer.arrays[0], want.tiles)


def test_unsplit_tiling_and_limits_are_passed_through(pool):
    data = encoded(rng_image(140, 90, seed=4), "PNG")
    unsplit = ImageSettings(tile_size=64, longest_edge=192, do_image_splitting=False)
    answer = pool.run("image.tile", {"settings": unsplit.to_dict()}, data, deadline_s=20)
    assert answer.result == {"rows": 0, "cols": 0}
    assert np.array_equal(answer.arrays[0], tile_image(load_image(data), unsplit).tiles)
    with pytest.raises(ImageTooManyPixelsError) as refused:
        pool.run("image.tile", {"settings": SETTINGS.to_dict(), "limits": {"max_pixels": 1000}}, data, deadline_s=20)
    assert refused.value.limit == "max_pixels"


def test_probe_gives_the_display_size_load_image_gives(pool):
    from PIL import Image

    image = rng_image(120, 80, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: the display size is 80×120
    data = encoded(image, "JPEG", exif=exif.tobytes())
    answer = pool.run("image.probe", {}, data, deadline_s=20)
    assert answer.arrays == []
    assert (answer.result["width"], answer.result["height"]) == image_size(data) == load_image(data).size == (80, 120)


def test_probe_refusals_are_the_same_error_classes_as_in_process(pool):
    from PIL import Image

    progressive = encoded(rng_image(64, 64, seed=6), "JPEG", progressive=True)
    limits = {"max_jpeg_scans": 2}
    with pytest.raises(ImageTooComplexError) as scans:
        pool.run("image.probe", {"limits": limits}, progressive, deadline_s=20)
    with pytest.raises(ImageTooComplexError) as local:
        load_image(progressive, limits=DecodeLimits(max_jpeg_scans=2))
    assert scans.value.limit == local.value.limit == "max_jpeg_scans"
    assert str(scans.value) == str(local.value)
    big = encoded(Image.new("L", (5000, 4000)), "PNG")
    with pytest.raises(ImageTooManyPixelsError):
        pool.run("image.probe", {"limits": {"max_pixels": 10_000_000}}, big, deadline_s=20)
    with pytest.raises(ImageError, match="cannot be read"):
        pool.run("image.probe", {}, b"\x89PNG not really", deadline_s=20)
    with pytest.raises(ImageError, match="empty"):
        pool.run("image.probe", {}, b"", deadline_s=20)


def test_video_probe_equals_probe_video(pool):
    from rksmolvlm.processing.video import VideoLimits, probe_video

    data = tiny_mp4()
    answer = pool.run("video.probe", {}, data, deadline_s=20)
    assert answer.result == asdict(probe_video(data, VideoLimits()))
    assert answer.result["total_num_frames"] == 12


def test_video_frames_equal_the_video_encoder_path(pool):
    from rksmolvlm.processing.video import VideoLimits, VideoReader
    from rksmolvlm.processing.video_frames import VideoSettings, resize_frames

    data = tiny_mp4()
    settings = VideoSettings(fps=2.0, max_frames=16, longest_edge=80, frame_size=48)
    indices = [0, 1, 3, 5, 6, 7, 8, 9, 10, 11]  # more than one decode batch (8)
    answer = pool.run("video.frames", {"indices": indices, "settings": settings.to_dict()}, data, deadline_s=20)
    with VideoReader(data, VideoLimits()) as reader:  # what runtime/video.py's VideoEncoder._frames does
        want = np.concatenate([resize_frames(reader.read_frames(indices[:8]), settings),
                               resize_frames(reader.read_frames(indices[8:]), settings)])
    assert answer.result == {}
    assert answer.arrays[0].shape == (10, 48, 48, 3)
    assert np.array_equal(answer.arrays[0], want)


def test_video_refusals_come_back_as_video_errors(pool):
    from rksmolvlm.errors import VideoError, VideoTooLargeError

    data = tiny_mp4()
    with pytest.raises(VideoTooLargeError) as side:
        pool.run("video.probe", {"limits": {"max_side": 64}}, data, deadline_s=20)
    assert side.value.limit == "max_side"
    with pytest.raises(VideoError):
        pool.run("video.probe", {}, b"\x00" * 4096, deadline_s=20)


def test_bad_params_are_the_callers_error_before_any_child(pool):
    with pytest.raises(ValueError, match="unknown jail op"):
        pool.run("image.explode", {}, b"x", deadline_s=5)
    with pytest.raises(ValueError, match="unknown fields"):
        pool.run("image.probe", {"limits": {"max_pixel": 5}}, b"x", deadline_s=5)
    from rksmolvlm.processing.video_frames import VideoSettings

    settings = VideoSettings(fps=2.0, max_frames=16, longest_edge=80, frame_size=48).to_dict()
    with pytest.raises(ValueError, match="indices"):
        pool.run("video.frames", {"indices": list(range(1025)), "settings": settings}, b"x", deadline_s=5)
    with pytest.raises(ValueError, match="indices"):
        pool.run("video.frames", {"indices": [1, -2], "settings": settings}, b"x", deadline_s=5)
    assert pool.snapshot()["killed"] == {}


def test_a_decode_over_the_memory_budget_is_an_error_in_the_child_not_parent_growth():
    from PIL import Image

    data = encoded(Image.new("RGB", (5000, 4000), (200, 10, 10)), "PNG")  # 80 MB decoded, a few KB sent
    with DecodePool(workers=1, reserved=0, max_memory=48 * MIB) as pool:
        assert pool.wait_ready(60)
        before = vm_rss()
        with pytest.raises(ImageDecodeTooLargeError) as refused:
            pool.run("image.tile", {"settings": SETTINGS.to_dict()}, data, deadline_s=30)
        grown = vm_rss() - before
        assert refused.value.limit == "max_memory"
        assert "decode.max_memory" in str(refused.value)
        assert grown < 8 * MIB, f"the parent grew by {grown / MIB:.1f} MiB"
        assert pool.snapshot()["killed"] == {"memory": 1}  # a fresh child after an out-of-memory task
        assert pool.wait_ready(60)
        small = encoded(rng_image(100, 60), "PNG")
        assert np.array_equal(pool.run("image.tile", {"settings": SETTINGS.to_dict()}, small, deadline_s=30).arrays[0],
                              tile_image(load_image(small), SETTINGS).tiles)


def test_a_video_decode_over_the_memory_budget_ends_in_the_child():
    from rksmolvlm.errors import VideoTooLargeError
    from rksmolvlm.processing.video_frames import VideoSettings

    # 4K: 25 MB a frame as RGB, a few KB sent
    data = tiny_mp4(frames=2, width=3840, height=2160, flat=True, preset="ultrafast")
    settings = VideoSettings(fps=1.0, max_frames=4, longest_edge=384, frame_size=384).to_dict()
    with DecodePool(workers=1, reserved=0, max_memory=64 * MIB) as pool:
        assert pool.wait_ready(60)
        before = vm_rss()
        with pytest.raises(VideoTooLargeError) as refused:
            pool.run("video.frames", {"indices": [0, 1], "settings": settings}, data, deadline_s=30)
        grown = vm_rss() - before
    assert refused.value.limit == "max_memory" and "64 MiB" in str(refused.value)
    assert grown < 8 * MIB, f"the parent grew by {grown / MIB:.1f} MiB"


def test_concurrent_calls_from_many_threads_each_get_their_own_answer(pool):
    images = [encoded(rng_image(60 + 17 * k, 40 + 11 * k, seed=k), "PNG") for k in range(12)]
    want = [tile_image(load_image(data), SETTINGS).tiles for data in images]
    got: dict[int, np.ndarray] = {}

    def one(k: int) -> None:
        lane = "worker" if k % 4 == 0 else "check"
        got[k] = pool.run("image.tile", {"settings": SETTINGS.to_dict()}, images[k], deadline_s=60, lane=lane,
                          client=f"client{k % 3}").arrays[0]

    import threading

    threads = [threading.Thread(target=one, args=(k,)) for k in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(got) == list(range(12))
    assert all(np.array_equal(got[k], want[k]) for k in range(12))
    snap = pool.snapshot()
    assert set(snap) == {"workers", "alive", "busy", "waiting", "spawned", "killed", "max_memory", "no_network"}
    assert snap["busy"] == snap["waiting"] == 0 and snap["alive"] == 2


def test_video_frames_equal_what_the_runner_decodes_in_process_today(pool):
    from types import SimpleNamespace

    from rksmolvlm.processing.video_frames import VideoSettings
    from rksmolvlm.runtime.video import VideoEncoder

    if not hasattr(VideoEncoder, "_frames"):
        pytest.skip("VideoEncoder no longer decodes in process (runtime/video.py decodes through a MediaDecoder)")
    data = tiny_mp4(frames=20)
    settings = VideoSettings(fps=2.0, max_frames=16, longest_edge=80, frame_size=48)
    indices = [0, 2, 4, 7, 9, 11, 13, 15, 17, 19]
    plan = SimpleNamespace(part=SimpleNamespace(source=data), indices=np.asarray(indices))
    want = VideoEncoder(None, settings)._frames(plan, list(range(len(indices))), lambda: False)
    answer = pool.run("video.frames", {"indices": indices, "settings": settings.to_dict()}, data, deadline_s=20)
    assert np.array_equal(answer.arrays[0], want)
