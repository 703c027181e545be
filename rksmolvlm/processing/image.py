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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from rksmolvlm.errors import ImageError

__all__ = [
    "ImageSettings", "TiledImage", "ImageSource", "DEFAULT_MAX_PIXELS",
    "load_image", "tile_image", "normalize", "preprocess",
]

MAX_IMAGE_SIZE = 4096  # transformers caps the resized image at 4k on its longest edge
DEFAULT_MAX_PIXELS = 100_000_000  # decoded pixels; larger inputs are refused before decoding

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


@dataclass
class TiledImage:
    """One image cut into tiles: ``tiles`` is uint8 (N, T, T, 3); rows = cols = 0 when unsplit."""

    tiles: np.ndarray
    rows: int
    cols: int

    @property
    def count(self) -> int:
        return int(self.tiles.shape[0])


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file path, bytes or PIL image into an RGB PIL image (EXIF orientation applied,
    transparency composited on white). Refuses images over ``max_pixels`` before decoding."""
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            if isinstance(source, (bytes, bytearray)):
                if not source:
                    raise ImageError("the image is empty (0 bytes): send the image file's contents")
                image = Image.open(io.BytesIO(source))
            else:
                path = Path(source)
                if not path.is_file():
                    raise ImageError(f"image file not found: {path}")
                image = Image.open(path)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image refused as a decompression bomb ({exc}): its pixel count is over the limit of "
                             f"{max_pixels:,}; downscale it first") from exc
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot decode the image ({exc}): use a PNG, JPEG, WebP, BMP, GIF or TIFF file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}×{height} = {width * height:,} pixels, over the limit of {max_pixels:,}: "
            "downscale it first or raise the pixel limit")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}×{height})")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode the image ({exc}): the file looks truncated or corrupt") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image).astype(np.float64)
        scale = 255.0 / 65535.0 if image.mode != "F" and array.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8), mode="L")
    # The same rule as transformers.image_transforms.convert_to_rgb.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
