"""Image → tiles, exactly as transformers' Idefics3/SmolVLM image processors (PIL backend).

Depends on numpy and Pillow only. The algorithm (transformers ``image_processing_pil_idefics3``):
resize so the longest edge is ``longest_edge`` (the short side ``int(long/aspect)``, rounded up to
even), cap at 4096, round both sides up to tile multiples, cut row-major tiles and append the whole
image squashed to T×T as the global image; every resize is Pillow LANCZOS on uint8. The board feeds
the uint8 NHWC tiles to the RKNN model (normalization is baked into it); ``normalize`` gives the
float tiles transformers would give, for the host preview and for parity checks.

One deliberate difference: 16-bit images are scaled to 8 bits (transformers clips them to 255).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from rksmolvlm.errors import ImageDecodeTooLargeError, ImageError, ImageTooManyPixelsError
from rksmolvlm.processing.image_safety import (DEFAULT_MAX_PIXELS, DeadlineReader, DecodeLimits, check_decodable,
                                               check_jpeg)

__all__ = [
    "ImageSettings", "TiledImage", "ImageSource", "DEFAULT_MAX_PIXELS", "IMAGE_FORMATS", "DecodeLimits",
    "load_image", "tile_image", "split_layout", "image_size", "normalize", "preprocess", "Resolution",
    "valid_longest_edges",
]

MAX_IMAGE_SIZE = 4096  # transformers caps the resized image at 4k on its longest edge
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # the only decoders untrusted bytes reach

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


@dataclass(frozen=True)
class ImageSettings:
    """The image processor settings of one checkpoint, as stored in the bundle manifest."""

    tile_size: int
    longest_edge: int
    do_image_splitting: bool = True
    resample: int = int(Image.Resampling.LANCZOS)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    video_sampling: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSettings":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("image_mean", "image_std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def valid_longest_edges(tile_size: int) -> list[int]:
    """The longest_edge values a resolution budget may ask for: every multiple k·T up to 4096."""
    return [k * tile_size for k in range(1, MAX_IMAGE_SIZE // tile_size + 1)] or [tile_size]


@dataclass(frozen=True)
class Resolution:
    """A resolution budget for an image, each field one of transformers' processor settings.

    ``longest_edge``: the processor's ``size={"longest_edge": N}``, a multiple k·T of the tile size
    T (None: the checkpoint's own). ``max_tiles``: at most this many split tiles (the global image
    not counted): the longest_edge used is the largest k·T, at most ``longest_edge``, whose split of
    THIS image gives rows·cols ≤ max_tiles (k = 1 always qualifies: one tile, no split). ``split``
    False: ``do_image_splitting=False`` (the image resized to longest_edge, then squashed to one
    T×T tile). ``settings`` gives the processor settings that reproduce the choice exactly."""

    longest_edge: int | None = None
    max_tiles: int | None = None
    split: bool = True

    def __post_init__(self):
        for name in ("longest_edge", "max_tiles"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name.replace('_', ' ')} {value!r} must be a whole number of at least 1")

    def check(self, tile_size: int) -> None:
        """ValueError naming the valid values when ``longest_edge`` is not a multiple of the tile size."""
        valid = valid_longest_edges(tile_size)
        if self.longest_edge is not None and self.longest_edge not in valid:
            raise ValueError(f"image size {self.longest_edge} is not a multiple of this model's tile size {tile_size}: "
                             f"use one of {', '.join(map(str, valid))}")

    def settings(self, base: ImageSettings, size: tuple[int, int] | None = None) -> ImageSettings:
        """The processor settings of this budget for an image of ``size`` (width, height); the size
        is needed only with ``max_tiles``."""
        longest = self.longest_edge or base.longest_edge
        if not (self.split and base.do_image_splitting):
            return replace(base, longest_edge=longest, do_image_splitting=False)
        out = replace(base, longest_edge=longest)
        if self.max_tiles is None:
            return out
        if size is None:
            raise ValueError("a max_tiles budget needs the image size")
        tile = base.tile_size
        for edge in [longest] + [k * tile for k in range(longest // tile, 0, -1) if k * tile < longest]:
            rows, cols = split_layout(*size, replace(out, longest_edge=edge))
            if rows * cols <= self.max_tiles:
                return replace(out, longest_edge=edge)
        return replace(out, longest_edge=min(longest, tile))

    @property
    def label(self) -> str:
        parts = [f"longest_edge={self.longest_edge}" if self.longest_edge else "",
                 f"max_tiles={self.max_tiles}" if self.max_tiles is not None else "", "" if self.split else "no-split"]
        return ", ".join(p for p in parts if p) or "the model's"


@dataclass
class TiledImage:
    """One image cut into tiles: ``tiles`` is uint8 (N, T, T, 3); rows = cols = 0 when unsplit."""

    tiles: np.ndarray
    rows: int
    cols: int

    @property
    def count(self) -> int:
        return int(self.tiles.shape[0])


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               limits: DecodeLimits | None = None) -> Image.Image:
    """Decode a file path, bytes or PIL image into an RGB PIL image (EXIF orientation applied,
    transparency composited on white). Before decoding, refuses what is over ``limits`` (default:
    ``DecodeLimits(max_pixels)``): the pixel count, the side, the decode memory by mode and size, a
    JPEG's scan count; while decoding, a decode that outlives ``limits.max_decode_seconds``. Each
    refusal is an ImageError subclass whose ``code`` names it (see ``image_safety``)."""
    limits = limits or DecodeLimits(max_pixels=max_pixels)
    reader = None
    if isinstance(source, Image.Image):
        image = source
        check_decodable(image, limits)
    else:
        data = _read_source(source)
        jpeg = check_jpeg(data, limits)
        reader = DeadlineReader(data, limits.max_decode_seconds)
        try:
            image = Image.open(reader, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as exc:
            raise ImageTooManyPixelsError(f"image refused as a decompression bomb ({exc}): its pixel count is over the "
                                          f"limit of {limits.max_pixels:,}; downscale it first") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"cannot decode the image ({exc}): use a PNG, JPEG, WebP, BMP, GIF or TIFF file") from exc
        check_decodable(image, limits, jpeg, data)
    try:
        if reader is not None:
            reader.start()
        image.load()
        image = _upright(image, owned=reader is not None)
        return _to_rgb(image)
    except MemoryError:
        raise ImageDecodeTooLargeError(f"decoding the {image.width}×{image.height} image ran out of memory: downscale "
                                       "it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot decode the image ({exc}): the file looks truncated or corrupt") from exc


def _read_source(source: str | os.PathLike | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read the image file {path} ({exc.strerror or exc}): check the path") from None
    if not data:
        raise ImageError("the image is empty (0 bytes): send the image file's contents")
    return data


def _upright(image: Image.Image, owned: bool) -> Image.Image:
    """The image turned as its EXIF orientation says; an image we opened is turned in place (no copy)."""
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
        return image
    return ImageOps.exif_transpose(image)


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_BAND_PIXELS = 1 << 20  # pixels converted at a time where conversion needs work buffers


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB. 16-bit, float and transparent images are converted a band of rows at a time (each band
    exactly as the whole image would be), so the work buffers stay small beside the RGB result."""
    if image.mode in _HIGH_DEPTH:
        peak = max((int(np.asarray(band).max(initial=0)) for band in _bands(image)), default=0) \
            if image.mode != "F" else 0
        scale = 255.0 / 65535.0 if peak > 255 else 1.0
        return _banded(image, lambda band: _eight_bit(band, scale).convert("RGB"))
    # The same rule as transformers.image_transforms.convert_to_rgb.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return _banded(image, _on_white)
    return image if image.mode == "RGB" else image.convert("RGB")


def _eight_bit(image: Image.Image, scale: float) -> Image.Image:
    array = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _bands(image: Image.Image):
    rows = max(1, _BAND_PIXELS // image.width)
    for top in range(0, image.height, rows):
        yield image.crop((0, top, image.width, min(top + rows, image.height)))


def _banded(image: Image.Image, convert) -> Image.Image:
    if image.width * image.height <= _BAND_PIXELS:
        return convert(image)
    out = Image.new("RGB", image.size)
    top = 0
    for band in _bands(image):
        out.paste(convert(band), (0, top))
        top += band.height
    return out


def _scaled_to_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Cap at MAX_IMAGE_SIZE (a no-op for every published longest_edge).
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _rounded_to_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image.resize((width, height), resample=resample)


def tile_image(image: Image.Image, settings: ImageSettings) -> TiledImage:
    """Cut an RGB image into uint8 NHWC tiles the way the checkpoint's processor does."""
    tile = settings.tile_size
    height, width = _scaled_to_longest_edge(image.height, image.width, settings.longest_edge)
    image = _resize(image, height, width, settings.resample)
    if not settings.do_image_splitting:
        return TiledImage(np.asarray(_resize(image, tile, tile, settings.resample))[None], 0, 0)
    height, width = _rounded_to_tiles(height, width, tile)
    image = _resize(image, height, width, settings.resample)
    if height <= tile and width <= tile:
        return TiledImage(np.asarray(image)[None], 0, 0)
    rows, cols = (height - tile) // tile + 1, (width - tile) // tile + 1
    pixels = np.asarray(image)
    tiles = np.empty((rows * cols + 1, tile, tile, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            tiles[r * cols + c] = pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
    tiles[-1] = np.asarray(_resize(image, tile, tile, settings.resample))
    return TiledImage(tiles, rows, cols)


def split_layout(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """The (rows, cols) ``tile_image`` gives an image of this size, without touching pixels."""
    tile = settings.tile_size
    if not settings.do_image_splitting:
        return 0, 0
    height, width = _scaled_to_longest_edge(height, width, settings.longest_edge)
    height, width = _rounded_to_tiles(height, width, tile)
    if height <= tile and width <= tile:
        return 0, 0
    return (height - tile) // tile + 1, (width - tile) // tile + 1


def image_size(source: ImageSource) -> tuple[int, int] | None:
    """The (width, height) ``load_image`` would give, from the header alone (no pixel is decoded),
    or None when the header cannot be read. EXIF orientation counts when the header carries it: a
    PNG's eXIf chunk after the pixel data is not seen, so callers treat the size as a prediction."""
    try:
        if isinstance(source, Image.Image):
            return _display_size(source)
        opened = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else Path(source),
                            formats=IMAGE_FORMATS)
        with opened:
            return _display_size(opened)
    except Exception:  # noqa: BLE001 - any unreadable header: load_image reports it properly
        return None


def _display_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    if image.format == "PNG" and "exif" not in image.info:
        return width, height  # PngImageFile.getexif() would decode the whole image to look further
    orientation = image.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def normalize(tiles: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """uint8 NHWC tiles → float32 NCHW, the same arithmetic as transformers (rescale in float64,
    downcast, then (x − mean) / std in float32), through a 256-entry table per channel: a uint8
    input has only 256 values, so the table gives the identical floats at a fraction of the cost."""
    levels = np.arange(256, dtype=np.float64)[:, None]
    scaled = (levels * settings.rescale_factor).astype(np.float32)
    table = (scaled - np.asarray(settings.image_mean, dtype=np.float32)) / np.asarray(settings.image_std,
                                                                                      dtype=np.float32)
    planar = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))  # transpose the uint8s, not the floats
    out = np.empty(planar.shape, dtype=np.float32)
    for channel in range(planar.shape[1]):
        np.take(table[:, channel], planar[:, channel], out=out[:, channel])
    return out


def preprocess(source: ImageSource, settings: ImageSettings, max_pixels: int = DEFAULT_MAX_PIXELS) -> TiledImage:
    """Load and tile one image."""
    return tile_image(load_image(source, max_pixels=max_pixels), settings)
