"""The server's MediaDecoder over the jail (runtime/jail/decoder.py): the same tiles, sizes, container
facts and frames as the in-process decoder; what the pre-queue check learned is not asked again; a
decode over its deadline or memory is a named too-complex refusal naming the config key; an abort
returns None at once; and a compromised child's facts outside the limits are refused."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.images import rng_image
from rksmolvlm.errors import ImageError, ImageTooComplexError, VideoTooComplexError
from rksmolvlm.processing.content import ImagePart, VideoPart
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.processing.video import VideoLimits
from rksmolvlm.processing.video_frames import VideoSettings
from rksmolvlm.runtime.decoding import InlineDecoder
from rksmolvlm.runtime.jail import DecodePool
from rksmolvlm.runtime.jail.decoder import JailedDecoder, _video_info

CLIP = Path(__file__).resolve().parents[1] / "data" / "video" / "h264_29.97fps_96x64.mp4"
SETTINGS = ImageSettings(tile_size=64, longest_edge=192)
VIDEO = VideoSettings(fps=1.0, max_frames=8, longest_edge=96, frame_size=64)


class CountingPool(DecodePool):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ops: list[str] = []
        self.clients: list = []

    def run(self, op, *args, **kwargs):
        self.ops.append(op)
        self.clients.append(kwargs.get("client"))
        return super().run(op, *args, **kwargs)


@pytest.fixture(scope="module")
def pool():
    pool = CountingPool(2, 512 * 2**20, reserved=1)
    pool.start()
    assert pool.wait_ready(60)
    yield pool
    pool.close()


def _jpeg(width, height, seed=0) -> bytes:
    out = io.BytesIO()
    rng_image(width, height, seed=seed).save(out, "JPEG", quality=90)
    return out.getvalue()


def _large_jpeg(width, height) -> bytes:
    """A large, cheap-to-make JPEG (a gradient): decoding and tiling it takes a while, making it does not."""
    out = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(out, "JPEG", quality=80)
    return out.getvalue()


def test_tiles_and_sizes_equal_the_in_process_decoder(pool):
    decoder = JailedDecoder(pool)
    for width, height in ((300, 200), (150, 500), (40, 30)):
        part = ImagePart(_jpeg(width, height))
        assert decoder.image_size(part, DecodeLimits()) == InlineDecoder().image_size(part, DecodeLimits())
        jailed = decoder.tile(part, SETTINGS, DecodeLimits())
        inline = InlineDecoder().tile(part, SETTINGS, DecodeLimits())
        assert (jailed.rows, jailed.cols) == (inline.rows, inline.cols)
        assert jailed.tiles.dtype == np.uint8 and np.array_equal(jailed.tiles, inline.tiles)


def test_exif_rotation_counts_in_the_size(pool):
    image = rng_image(300, 100, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: displayed 100×300
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    assert JailedDecoder(pool).image_size(ImagePart(out.getvalue()), DecodeLimits()) == (100, 300)


def test_what_the_check_learned_is_not_asked_again(pool):
    decoder = JailedDecoder(pool)
    data = _jpeg(320, 240, seed=5)
    pool.ops.clear()
    assert decoder.inspect_image(data, DecodeLimits()) == (320, 240)
    assert decoder.image_size(ImagePart(data), DecodeLimits()) == (320, 240)
    clip = CLIP.read_bytes()
    info = decoder.inspect_video(clip, VideoLimits())
    assert decoder.probe_video(VideoPart(clip), VideoLimits()) == info
    assert pool.ops == ["image.probe", "video.probe"]


def test_frames_equal_the_in_process_decoder(pool):
    part = VideoPart(CLIP.read_bytes())
    decoder = JailedDecoder(pool)
    info = decoder.probe_video(part, VideoLimits())
    indices = [0, 3, info.total_num_frames // 2, info.total_num_frames - 1]
    jailed = decoder.video_frames(part, indices, VIDEO, VideoLimits())
    inline = InlineDecoder().video_frames(part, indices, VIDEO, VideoLimits())
    assert jailed.shape == (4, 64, 64, 3) and np.array_equal(jailed, inline)


def test_a_decode_over_its_deadline_is_too_complex_naming_the_key(pool):
    decoder = JailedDecoder(pool, image_timeout_s=0.02)
    part = ImagePart(_large_jpeg(8000, 6000))
    start = time.monotonic()
    with pytest.raises(ImageTooComplexError, match=r"decode\.image_timeout_s = 0\.02 s") as info:
        decoder.tile(part, SETTINGS, DecodeLimits())
    assert time.monotonic() - start < 1.5
    assert info.value.code == "image_too_complex" and info.value.limit == "decode.image_timeout_s"
    # the pool replaced the killed child: the next decode is answered
    assert JailedDecoder(pool).tile(ImagePart(_jpeg(64, 64)), SETTINGS, DecodeLimits()) is not None


def test_a_decode_over_the_memory_allowance_is_refused_by_name():
    small = DecodePool(2, 64 * 2**20, reserved=1)
    small.start()
    try:
        assert small.wait_ready(60)
        decoder = JailedDecoder(small, max_memory=64 * 2**20)
        part = ImagePart(_large_jpeg(6000, 5000))  # 90 MB of RGB: over 64 MiB, within the decode budget
        with pytest.raises(ImageError) as info:
            decoder.tile(part, SETTINGS, DecodeLimits(max_decode_bytes=2**30))
        assert info.value.code in ("image_too_complex", "image_decode_too_large")
        assert "memory" in str(info.value)
    finally:
        small.close()


def test_an_aborted_decode_returns_none_at_once(pool):
    decoder = JailedDecoder(pool, image_timeout_s=30)
    part = ImagePart(_large_jpeg(8000, 6000))
    start = time.monotonic()
    assert decoder.tile(part, SETTINGS, DecodeLimits(), aborted=lambda: time.monotonic() - start > 0.05) is None
    assert time.monotonic() - start < 0.8


@pytest.mark.parametrize("field, value", [("total_num_frames", 10**12), ("duration", float("nan")), ("width", 0),
                                          ("height", 10**6), ("codec", "x" * 500), ("fps", -1.0),
                                          ("rotation", "90")])
def test_a_childs_video_facts_outside_the_limits_are_refused(field, value):
    facts = {"total_num_frames": 30, "duration": 1.0, "fps": 30.0, "width": 96, "height": 64, "codec": "h264",
             "pix_fmt": "yuv420p", "color_range": "tv", "color_space": "unknown", "rotation": 0}
    assert _video_info(facts, VideoLimits()).total_num_frames == 30
    with pytest.raises(VideoTooComplexError, match="outside its limits"):
        _video_info({**facts, field: value}, VideoLimits())


def test_the_servers_check_waits_for_a_child_as_the_requests_client(pool):
    from rksmolvlm.runtime.server.config import ServerConfig
    from rksmolvlm.runtime.server.media_checks import MEDIA_CLIENT, check_image

    decoder = JailedDecoder(pool)
    pool.clients.clear()
    token = MEDIA_CLIENT.set("192.0.2.7")
    try:
        check_image(_jpeg(50, 40, seed=11), "messages[0].content[0].image_url", ServerConfig(), decoder)
    finally:
        MEDIA_CLIENT.reset(token)
    assert pool.clients == ["192.0.2.7"]
