"""processing/image: byte-identical with transformers' own image processors over a matrix of
sizes and modes, for both model classes; hostile inputs get clear errors."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import Idefics3ImageProcessorPil, SmolVLMImageProcessorPil

from support.images import rng_image
from rksmolvlm.errors import ImageError
from rksmolvlm.processing.image import ImageSettings, load_image, normalize, preprocess, tile_image

GEOMETRIES = {  # (processor class, tile, longest edge): the published ones and the fixtures'
    "idefics3-512": (Idefics3ImageProcessorPil, 512, 2048),
    "idefics3-384": (Idefics3ImageProcessorPil, 384, 1536),
    "smolvlm-512": (SmolVLMImageProcessorPil, 512, 2048),
    "smolvlm-64": (SmolVLMImageProcessorPil, 64, 256),
}
CASES = [  # width, height, mode
    (640, 480, "RGB"), (480, 640, "RGB"),  # landscape, portrait
    (512, 512, "RGB"), (1024, 512, "RGB"), (384, 768, "RGB"),  # exact tile multiples
    (100, 60, "RGB"), (7, 300, "RGB"), (1, 1, "RGB"),  # smaller than a tile, extreme aspect
    # larger than the max edge: transformers' processor takes seconds on these, so they run in the full suite only
    pytest.param(2500, 1800, "RGB", marks=pytest.mark.slow), pytest.param(4100, 300, "RGB", marks=pytest.mark.slow),
    (333, 222, "L"), (300, 200, "RGBA"), (300, 200, "LA"), (257, 129, "P"), (200, 300, "CMYK"),
]


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("width,height,mode", CASES)
def test_pixel_values_byte_identical(geometry, width, height, mode):
    cls, tile, longest = GEOMETRIES[geometry]
    processor = cls(size={"longest_edge": longest}, max_image_size={"longest_edge": tile})
    image = rng_image(width, height, mode, seed=width * 7 + height)
    reference = processor(images=[[image]], return_tensors="np", return_row_col_info=True)
    settings = ImageSettings(tile_size=tile, longest_edge=longest)
    tiled = tile_image(load_image(image), settings)
    ours = normalize(tiled.tiles, settings)
    assert ours.dtype == np.float32
    assert ours.shape == reference["pixel_values"][0].shape
    assert ours.tobytes() == reference["pixel_values"][0].tobytes()
    assert (tiled.rows, tiled.cols) == (reference["rows"][0][0], reference["cols"][0][0])
    assert tiled.tiles.dtype == np.uint8 and tiled.tiles.shape[1:] == (tile, tile, 3)


def test_unsplit_setting_matches(tiny_checkpoints):
    processor = Idefics3ImageProcessorPil(size={"longest_edge": 256}, max_image_size={"longest_edge": 64},
                                          do_image_splitting=False)
    image = rng_image(300, 200)
    reference = processor(images=[[image]], return_tensors="np")["pixel_values"][0]
    settings = ImageSettings(tile_size=64, longest_edge=256, do_image_splitting=False)
    tiled = tile_image(load_image(image), settings)
    assert (tiled.rows, tiled.cols, tiled.count) == (0, 0, 1)
    assert normalize(tiled.tiles, settings).tobytes() == reference.tobytes()


SETTINGS = ImageSettings(tile_size=64, longest_edge=256)


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_file_formats_decode_the_same(tmp_path):
    image = rng_image(120, 80)
    for fmt, suffix in (("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")):
        path = tmp_path / f"x.{suffix}"
        image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert np.array_equal(preprocess(path, SETTINGS).tiles, preprocess(image, SETTINGS).tiles), fmt


def test_exif_orientation_is_applied(tmp_path):
    image = rng_image(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    image.save(path, format="JPEG", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (80, 120)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    image = Image.open(io.BytesIO(_png(Image.fromarray(ramp))))
    assert image.mode.startswith("I")
    rgb = np.asarray(load_image(image))
    assert rgb.shape == (64, 64, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb[32, 0, 0] < 155  # mid-range stays mid-range (clipping would give 255)


def test_transparency_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]


def test_decompression_bomb_refused_before_decoding():
    header_only = _png(Image.new("L", (1, 1)))
    big = Image.new("1", (30000, 30000))  # a 1-bit 30000×30000 PNG is small on disk
    data = _png(big, optimize=True)
    assert len(data) < 2_000_000
    with pytest.raises(ImageError, match="over the limit"):
        load_image(data)
    medium = _png(Image.new("1", (12000, 10000)), optimize=True)  # under Pillow's own bomb limit
    with pytest.raises(ImageError, match="120,000,000 pixels, over the limit of 100,000,000"):
        load_image(medium)
    assert load_image(header_only).size == (1, 1)


@pytest.mark.parametrize("data,match", [(b"", "empty"), (b"not an image at all", "cannot decode"),
                                        (_png(Image.new("RGB", (50, 50)))[:60], "cannot decode")])
def test_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_manifest_round_trip():
    settings = ImageSettings(tile_size=384, longest_edge=1536, video_sampling={"fps": 1})
    assert ImageSettings.from_dict(settings.to_dict()) == settings
