"""Images → image features: decode and tile what is not cached, encode the tiles on the vision
engine, and keep the features of recent images in an LRU cache keyed by their content and split.

Each image is tiled one of two ways: ``split`` (the checkpoint's processor as configured: tiles
plus the global image) or unsplit (``do_image_splitting=False``: one tile, the whole image
squashed), at a resolution budget (``Resolution``: the processor's longest_edge, or the most
tiles): the choice resolves to the exact processor settings of the image. The same image split and
unsplit, or at two longest_edges, has different features and layouts, so the cache keys carry the
resolved settings. ``layout`` answers how an image would be tiled from the cache or the image
header alone, so the runner can choose splits before anything is decoded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import ImagePart
from rksmolvlm.processing.image import DEFAULT_MAX_PIXELS, ImageSettings, Resolution, TiledImage, split_layout
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.runtime.decoding import NEVER, DecodeAborted, InlineDecoder, MediaDecoder
from rksmolvlm.runtime.engines import PerfStats, VisionEncoder

__all__ = ["ImageEncoder", "PreparedImage", "FeatureCache", "UNSPLIT", "Tiling"]

UNSPLIT = Layout(0, 0)  # the layout of every unsplit image
Tiling = Union[bool, Resolution]  # how to tile one image: split (True/False) at the checkpoint's size, or a budget


@dataclass
class PreparedImage:
    part: ImagePart
    layout: Layout
    tiles: np.ndarray | None  # uint8 (N, T, T, 3); None when the features are cached
    split: bool = True  # tiled as the processor splits (False: one unsplit tile)
    settings: ImageSettings | None = None  # the processor settings it was tiled with (its resolution)

    @property
    def tile_count(self) -> int:
        """Tower passes of this image: rows·cols split tiles plus the global image, or one tile."""
        return self.layout.rows * self.layout.cols + 1 if self.layout != UNSPLIT else 1


class FeatureCache:
    """Features of the last ``size`` images, by content hash, split mode and longest_edge."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, tuple[np.ndarray, Layout | None]] = OrderedDict()

    @staticmethod
    def key(part: ImagePart, split: bool | ImageSettings) -> str:
        if isinstance(split, ImageSettings):
            return f"{part.key}:{'split' if split.do_image_splitting else 'unsplit'}@{split.longest_edge}"
        return f"{part.key}:{'split' if split else 'unsplit'}"

    def get(self, key: str) -> tuple[np.ndarray, Layout | None] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def layout(self, key: str) -> Layout | None:
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def put(self, key: str, features: np.ndarray, layout: Layout | None) -> None:
        """``layout`` None: a video frame's features (a frame is always one unsplit tile)."""
        self._entries[key] = (features, layout)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class ImageEncoder:
    """The vision side of a request: ``layout`` predicts, ``prepare`` decodes and tiles (layouts
    are known before any NPU work, for the context check), ``encode`` runs the tiles of uncached
    images."""

    def __init__(self, encoder: VisionEncoder, settings: ImageSettings, cache_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
                 decoder: MediaDecoder | None = None):
        self.encoder = encoder
        self.settings = settings
        self.limits = limits or DecodeLimits(max_pixels=max_pixels)
        self.decoder: MediaDecoder = decoder or InlineDecoder()
        self.cache = FeatureCache(cache_size)

    def settings_for(self, part: ImagePart, tiling: Tiling = True) -> ImageSettings:
        """The processor settings ``part`` is tiled with under ``tiling`` (a max_tiles budget reads
        the image size from the header; the tile count does not depend on the EXIF rotation)."""
        resolution = tiling if isinstance(tiling, Resolution) else Resolution(split=bool(tiling))
        if resolution.max_tiles is not None and resolution.split and self.settings.do_image_splitting:
            return resolution.settings(self.settings, self._size(part))
        return resolution.settings(self.settings)

    def layout(self, part: ImagePart, tiling: Tiling = True) -> Layout:
        """How ``part`` will be tiled: exact from the cache or for unsplit images, predicted from the
        image header otherwise (``prepare`` gives the exact layout)."""
        settings = self.settings_for(part, tiling)
        if not settings.do_image_splitting:
            return UNSPLIT
        cached = self.cache.layout(FeatureCache.key(part, settings))
        if cached is not None:
            return cached
        return Layout(*split_layout(*self._size(part), settings))

    def prepare(self, images: Sequence[ImagePart], splits: Sequence[Tiling] | None = None,
                aborted: Callable[[], bool] = NEVER) -> list[PreparedImage]:
        """Tile every image that is not cached, ``splits[i]`` saying how (a split mode or a
        Resolution; default: all split at the checkpoint's resolution). DecodeAborted when ``aborted``
        turned true meanwhile."""
        splits = [True] * len(images) if splits is None else list(splits)
        if len(splits) != len(images):
            raise ValueError(f"{len(images)} images but {len(splits)} split modes")
        out: list[PreparedImage] = []
        seen: dict[str, PreparedImage] = {}
        for part, tiling in zip(images, splits):
            settings = self.settings_for(part, tiling)
            split = settings.do_image_splitting
            key = FeatureCache.key(part, settings)
            layout = self.cache.layout(key)
            if layout is not None:
                out.append(PreparedImage(part, layout, None, split, settings))
            elif key in seen:  # the same image twice in one request: tiled and encoded once
                out.append(PreparedImage(part, seen[key].layout, None, split, settings))
            else:
                tiled = self._tile(part, settings, aborted)
                if tiled is None:
                    raise DecodeAborted("the request was cancelled while its images were decoded")
                seen[key] = prepared = PreparedImage(part, Layout(tiled.rows, tiled.cols), tiled.tiles, split,
                                                     settings)
                out.append(prepared)
        return out

    def encode(self, prepared: Sequence[PreparedImage], stats: PerfStats,
               aborted: Callable[[], bool] = lambda: False) -> list[np.ndarray] | None:
        """Features per image, in order; None when ``aborted`` turned true between images."""
        out: list[np.ndarray] = []
        local: dict[str, np.ndarray] = {}
        for image in prepared:
            if aborted():
                return None
            settings = image.settings or self.settings_for(image.part, image.split)
            key = FeatureCache.key(image.part, settings)
            features = local.get(key)
            if features is None and image.tiles is None:
                cached = self.cache.get(key)
                features = cached[0] if cached else None
            if features is not None:
                stats.vision_cached_images += 1
            else:
                if image.tiles is None:  # evicted since prepare(): decode again
                    tiled = self._tile(image.part, settings, aborted)
                    if tiled is None:
                        return None
                    image.tiles = tiled.tiles
                start = time.perf_counter()
                features = self.encoder.encode(image.tiles)
                stats.vision_ms += (time.perf_counter() - start) * 1000
                stats.vision_tiles += len(image.tiles)
                self.cache.put(key, features, image.layout)
            local[key] = features
            out.append(features)
        return out

    def close(self) -> None:
        self.encoder.close()

    def _size(self, part: ImagePart) -> tuple[int, int]:
        return self.decoder.image_size(part, self.limits)

    def _tile(self, part: ImagePart, settings: ImageSettings, aborted: Callable[[], bool]) -> TiledImage | None:
        return self.decoder.tile(part, settings, self.limits, aborted)
