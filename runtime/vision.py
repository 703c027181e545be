"""Images → image features: decode and tile what is not cached, encode the tiles on the vision
engine, and keep the features of recent images in an LRU cache keyed by their content and split.

Each image is tiled one of two ways: ``split`` (the checkpoint's processor as configured: tiles
plus the global image) or unsplit (``do_image_splitting=False``: one tile, the whole image
squashed). The same image split and unsplit has different features and layouts, so the cache
keeps them apart. ``layout`` answers how an image would be tiled from the cache or the image
header alone, so the runner can choose splits before anything is decoded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import ImagePart
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.processing.image import (DEFAULT_MAX_PIXELS, ImageSettings, image_size, load_image, split_layout,
                                        tile_image)
from rksmolvlm.runtime.engines import PerfStats, VisionEncoder

__all__ = ["ImageEncoder", "PreparedImage", "FeatureCache", "UNSPLIT"]

UNSPLIT = Layout(0, 0)  # the layout of every unsplit image


@dataclass
class PreparedImage:
    part: ImagePart
    layout: Layout
    tiles: np.ndarray | None  # uint8 (N, T, T, 3); None when the features are cached
    split: bool = True  # tiled as the processor splits (False: one unsplit tile)


class FeatureCache:
    """Features of the last ``size`` images, by content hash and split mode."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, tuple[np.ndarray, Layout]] = OrderedDict()

    @staticmethod
    def key(part: ImagePart, split: bool) -> str:
        return f"{part.key}:{'split' if split else 'unsplit'}"

    def get(self, key: str) -> tuple[np.ndarray, Layout] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def layout(self, key: str) -> Layout | None:
        entry = self._entries.get(key)
        return entry[1] if entry else None

    def put(self, key: str, features: np.ndarray, layout: Layout) -> None:
        self._entries[key] = (features, layout)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class ImageEncoder:
    """The vision side of a request: ``layout`` predicts, ``prepare`` decodes and tiles (layouts
    are known before any NPU work, for the context check), ``encode`` runs the tiles of uncached
    images."""

    def __init__(self, encoder: VisionEncoder, settings: ImageSettings, cache_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None):
        self.encoder = encoder
        self.settings = settings
        self.unsplit_settings = replace(settings, do_image_splitting=False)
        self.limits = limits or DecodeLimits(max_pixels=max_pixels)
        self.cache = FeatureCache(cache_size)

    def layout(self, part: ImagePart, split: bool) -> Layout:
        """How ``part`` will be tiled: exact from the cache or for unsplit images, predicted from the
        image header otherwise (``prepare`` gives the exact layout)."""
        split = self._effective(split)
        if not split:
            return UNSPLIT
        cached = self.cache.layout(FeatureCache.key(part, split))
        if cached is not None:
            return cached
        size = image_size(part.source)
        if size is None:  # an unreadable header: decode now (load_image names the problem)
            size = load_image(part.source, limits=self.limits).size
        return Layout(*split_layout(*size, self.settings))

    def prepare(self, images: Sequence[ImagePart], splits: Sequence[bool] | None = None) -> list[PreparedImage]:
        """Tile every image that is not cached, ``splits[i]`` saying how (default: all split)."""
        splits = [True] * len(images) if splits is None else list(splits)
        if len(splits) != len(images):
            raise ValueError(f"{len(images)} images but {len(splits)} split modes")
        out, seen = [], {}
        for part, split in zip(images, map(self._effective, splits)):
            key = FeatureCache.key(part, split)
            layout = self.cache.layout(key)
            if layout is not None:
                out.append(PreparedImage(part, layout, None, split))
            elif key in seen:  # the same image twice in one request: tiled and encoded once
                out.append(PreparedImage(part, seen[key].layout, None, split))
            else:
                tiled = self._tile(part, split)
                seen[key] = prepared = PreparedImage(part, Layout(tiled.rows, tiled.cols), tiled.tiles, split)
                out.append(prepared)
        return out

    def encode(self, prepared: Sequence[PreparedImage], stats: PerfStats,
               aborted: Callable[[], bool] = lambda: False) -> list[np.ndarray] | None:
        """Features per image, in order; None when ``aborted`` turned true between images."""
        out, local = [], {}
        for image in prepared:
            if aborted():
                return None
            key = FeatureCache.key(image.part, image.split)
            features = local.get(key)
            if features is None and image.tiles is None:
                cached = self.cache.get(key)
                features = cached[0] if cached else None
            if features is not None:
                stats.vision_cached_images += 1
            else:
                if image.tiles is None:  # evicted since prepare(): decode again
                    image.tiles = self._tile(image.part, image.split).tiles
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

    def _effective(self, split: bool) -> bool:
        """A checkpoint whose processor does not split tiles every image unsplit, whatever is asked."""
        return bool(split) and self.settings.do_image_splitting

    def _tile(self, part: ImagePart, split: bool):
        return tile_image(load_image(part.source, limits=self.limits),
                          self.settings if split else self.unsplit_settings)
