"""processing/image_safety and load_image's limits: the JPEG scan counter walks the marker
structure (not a byte search), the decode-size rule by mode and size, refusals before decoding
with named codes, the decode deadline, and the banded conversion that keeps 16-bit, float and
transparent images' memory bounded while giving the same pixels."""

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from support.images import rng_image
from support.hostile_images import float_tiff, jpeg_tiff, scan_bomb, zero_png
from rksmolvlm.errors import ImageDecodeTooLargeError, ImageError, ImageTooComplexError, ImageTooManyPixelsError
from rksmolvlm.processing import image as image_module
from rksmolvlm.processing.image import load_image
from rksmolvlm.processing.image_safety import (DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_JPEG_SCANS, MAX_IMAGE_SIDE,
                                               MIN_JPEG_SCANS, DecodeLimits, check_decodable, check_jpeg,
                                               decode_bytes, inspect_jpeg, jpeg_scan_limit)
from rksmolvlm.runtime.server.config import Limits


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# -- the JPEG scan counter ----------------------------------------------------------------------------
def test_baseline_and_progressive_scans_are_counted():
    color = rng_image(120, 80)
    baseline = inspect_jpeg(_jpeg(color))
    assert (baseline.scans, baseline.progressive, baseline.components) == (1, False, 3)
    assert (baseline.width, baseline.height) == (120, 80) and baseline.complete
    progressive = inspect_jpeg(_jpeg(color, progressive=True))
    assert (progressive.scans, progressive.progressive) == (10, True)  # libjpeg's default script for YCbCr
    assert inspect_jpeg(_jpeg(color.convert("L"), progressive=True)).scans == 6  # … and for gray


def test_the_counter_skips_segment_payloads_and_entropy_data():
    # A comment holding SOS bytes, restart markers in the entropy data, fill bytes before a marker:
    # a naive search for FF DA would count 3 scans here.
    data = _jpeg(rng_image(64, 64), restart_marker_blocks=1, comment=b"\xff\xda\xff\xda")
    assert data.count(b"\xff\xda") == 3 and data.count(b"\xff\xd0") > 0
    assert inspect_jpeg(data).scans == 1
    eoi = data.rindex(b"\xff\xd9")
    assert inspect_jpeg(data[:eoi] + b"\xff\xff\xff" + data[eoi:]).scans == 1
    # Entropy data is full of stuffed FF 00 pairs (random pixels at high quality).
    noisy = _jpeg(rng_image(256, 256, seed=3), quality=100)
    assert noisy.count(b"\xff\x00") > 50 and inspect_jpeg(noisy).scans == 1


def test_only_the_first_image_counts_and_trailing_bytes_are_ignored():
    first, second = _jpeg(rng_image(32, 32)), _jpeg(rng_image(32, 32), progressive=True)
    assert inspect_jpeg(first + second).scans == 1  # an appended image (MPO-like) is never decoded
    assert inspect_jpeg(first[:-200]).scans == 1  # truncated
    assert inspect_jpeg(b"\x89PNG\r\n\x1a\n").scans == 0


def test_a_scan_bomb_is_counted_and_the_walk_stops_early():
    bomb = scan_bomb(256, 256, scans=3000)
    assert inspect_jpeg(bomb).scans == 3006
    start = time.perf_counter()
    early = inspect_jpeg(bomb, stop_after=100)
    assert not early.complete and early.scans == 101
    assert time.perf_counter() - start < 0.05


def test_scan_limit_shrinks_for_large_images():
    assert jpeg_scan_limit(100, 10_000_000) == 100
    assert jpeg_scan_limit(100, 20_000_000) == 50
    assert jpeg_scan_limit(100, 100_000_000) == MIN_JPEG_SCANS
    assert jpeg_scan_limit(5, 100_000_000) == 5
    assert check_jpeg(_jpeg(rng_image(64, 64), progressive=True), DecodeLimits()).scans == 10
    with pytest.raises(ImageTooComplexError, match="more than 100 scans, over the 100 allowed") as info:
        check_jpeg(scan_bomb(256, 256, scans=3000), DecodeLimits())
    assert info.value.code == "image_too_complex" and info.value.limit == "max_jpeg_scans"
    with pytest.raises(ImageTooComplexError, match="has 96 scans, over the 62 allowed for its 4000×4000 pixels"):
        check_jpeg(scan_bomb(4000, 4000, scans=90), DecodeLimits())


def test_the_scan_bomb_is_refused_before_decoding():
    bomb = scan_bomb(2000, 2000, scans=5000)  # decodes for about a minute when let through
    start = time.perf_counter()
    with pytest.raises(ImageTooComplexError, match="more than 100 scans") as info:
        load_image(bomb)
    assert time.perf_counter() - start < 1.0
    assert info.value.code == "image_too_complex"


def test_a_tiff_hiding_a_progressive_jpeg_strip_is_refused():
    assert load_image(jpeg_tiff(300, 200)).size == (300, 200)  # baseline strips: fine
    bomb = jpeg_tiff(2000, 2000, scan_bomb(2000, 2000, 300))  # libtiff would run 100 scans: ~2 s
    start = time.perf_counter()
    with pytest.raises(ImageTooComplexError, match="progressive") as info:
        load_image(bomb)
    assert time.perf_counter() - start < 0.5 and info.value.code == "image_too_complex"


# -- the decode-size rule -------------------------------------------------------------------------
MP = 1_000_000


@pytest.mark.parametrize("mode, extra, per_pixel", [
    ("RGB", {}, 4 + 4),             # stored in 4 bytes; the EXIF-rotated copy
    ("L", {}, 1 + 4),               # 1 byte; the RGB copy
    ("I;16", {}, 2 + 4),            # 16-bit: 2 bytes; its RGB copy (converted in bands)
    ("F", {}, 4 + 4),               # float: 4 bytes
    ("RGBA", {}, 4 + 4),
    ("P", {"transparency": True}, 1 + 4),
    ("RGB", {"progressive_components": 3}, 4 + 6),  # libjpeg's coefficient buffer: 2 bytes a sample
])
def test_decode_bytes_by_mode_and_size(mode, extra, per_pixel):
    assert decode_bytes(mode, (1000, 1000), **extra) == per_pixel * MP + 48 * 2000


def test_a_long_side_costs_the_resizer():
    assert decode_bytes("L", (1, 50_000_000)) > 2_400_000_000  # the Lanczos tables, not the pixels


def test_limits_match_the_server_defaults():
    assert Limits().max_decode_bytes == DEFAULT_MAX_DECODE_BYTES
    assert Limits().max_jpeg_scans == DEFAULT_MAX_JPEG_SCANS


HEADER_REFUSALS = {
    "97 KB 16-bit PNG": (lambda: zero_png(7000, 7000, 16), ImageDecodeTooLargeError, "image_decode_too_large",
                         "mode I;16"),
    "float TIFF": (lambda: float_tiff(3000, 3000), ImageDecodeTooLargeError, "image_decode_too_large", "mode F"),
    "1×50,000,000 PNG": (lambda: zero_png(1, 50_000_000), ImageDecodeTooLargeError, "image_decode_too_large",
                         f"over {MAX_IMAGE_SIDE:,}"),
    "120 MP 1-bit PNG": (lambda: zero_png(12000, 10000, 1), ImageTooManyPixelsError, "image_too_many_pixels",
                         "120,000,000 pixels"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", list(HEADER_REFUSALS))
def test_refused_from_the_header(case):
    make, error, code, words = HEADER_REFUSALS[case]
    data = make()
    limits = DecodeLimits(max_decode_bytes=64 * MP)
    with pytest.raises(error, match=words) as info:
        check_decodable(_opened(data), limits)
    assert info.value.code == code and isinstance(info.value, ImageError)
    start = time.perf_counter()
    with pytest.raises(error):
        load_image(data, limits=limits)
    assert time.perf_counter() - start < 1.0


def test_within_the_limits_an_image_passes():
    limits = DecodeLimits(max_decode_bytes=64 * MP)
    assert check_decodable(_opened(zero_png(2000, 2000, 16)), limits) == 6 * 4 * MP + 48 * 4000
    assert load_image(zero_png(2000, 2000, 16), limits=limits).size == (2000, 2000)


def test_a_pil_image_is_checked_too():
    with pytest.raises(ImageDecodeTooLargeError):
        load_image(Image.new("F", (3000, 3000)), limits=DecodeLimits(max_decode_bytes=16 * MP))


def test_a_decode_past_its_deadline_is_stopped():
    big = io.BytesIO()
    rng_image(1500, 1500, seed=4).save(big, "PNG", compress_level=0)  # many 64 KiB reads
    with pytest.raises(ImageTooComplexError, match="time budget") as info:
        load_image(big.getvalue(), limits=DecodeLimits(max_decode_seconds=1e-9))
    assert info.value.code == "image_too_complex"
    assert load_image(big.getvalue(), limits=DecodeLimits(max_decode_seconds=30)).size == (1500, 1500)


def test_running_out_of_memory_is_an_image_error(monkeypatch):
    def exhausted(image):
        raise MemoryError

    monkeypatch.setattr(image_module, "_to_rgb", exhausted)
    with pytest.raises(ImageDecodeTooLargeError, match="ran out of memory"):
        load_image(zero_png(64, 64))


def test_only_the_six_formats_are_decoded():
    buffer = io.BytesIO()
    rng_image(16, 16).save(buffer, "PPM")
    with pytest.raises(ImageError, match="PNG, JPEG, WebP, BMP, GIF or TIFF"):
        load_image(buffer.getvalue())


# -- bounded conversion, same pixels ------------------------------------------------------------------
def _whole(image: Image.Image) -> np.ndarray:
    """The conversion before it was banded (one pass over the whole image)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image).astype(np.float64)
        scale = 255.0 / 65535.0 if image.mode != "F" and array.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                          .convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _samples():
    rng = np.random.default_rng(7)
    wide = rng.integers(0, 65536, (90, 70), dtype=np.uint16)
    palette = Image.fromarray(rng.integers(0, 16, (90, 70), dtype=np.uint8), mode="P")
    palette.putpalette(list(rng.integers(0, 256, 48)))
    palette.info["transparency"] = 3
    return {
        "I;16": Image.fromarray(wide),
        "I;16 low": Image.fromarray((wide % 200).astype(np.uint16)),
        "I": Image.fromarray(rng.integers(-70000, 70000, (90, 70), dtype=np.int32)),
        "F": Image.fromarray(rng.normal(100, 90, (90, 70)).astype(np.float32)),
        "RGBA": Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)),
        "LA": Image.fromarray(rng.integers(0, 256, (90, 70, 2), dtype=np.uint8)),
        "P transparent": palette,
    }


@pytest.mark.parametrize("name", list(_samples()))
def test_banded_conversion_gives_the_same_pixels(name, monkeypatch):
    image = _samples()[name]
    monkeypatch.setattr(image_module, "_BAND_PIXELS", 70 * 7)  # 7-row bands: 13 of them, the last short
    assert np.array_equal(np.asarray(image_module._to_rgb(image)), _whole(image))


def _peak_rss_during(work) -> int:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - base


def test_a_sixteen_bit_png_decodes_in_bounded_memory():
    data = zero_png(4000, 4000, 16)  # 16 MP: 32 MB decoded; the unbanded float64 path took ~450 MB
    estimate = check_decodable(_opened(data), DecodeLimits())
    assert estimate < 100 * MP
    assert _peak_rss_during(lambda: load_image(data)) < estimate + 40 * MP
