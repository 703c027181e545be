"""Images → image features: decode and tile what is not cached, encode the tiles on the vision
engine, and keep the features of recent images in an LRU cache keyed by their content."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from rksmolvlm.processing.assembler import Layout
from rksmolvlm.processing.content import ImagePart
from rksmolvlm.processing.image import DEFAULT_MAX_PIXELS, ImageSettings, load_image, tile_image
from rksmolvlm.runtime.engines import PerfStats, VisionEncoder

__all__ = ["ImageEncoder", "PreparedImage", "FeatureCache"]


@dataclass
class PreparedImage:
    part: ImagePart
    layout: Layout
    tiles: np.ndarray | None  # uint8 (N, T, T, 3); None when the features are cached


class FeatureCache:
    """Features of the last ``size`` images, by content hash."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, tuple[np.ndarray, Layout]] = OrderedDict()

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
    """The vision side of a request: ``prepare`` decodes and tiles (layouts are known before any
    NPU work, for the context check), ``encode`` runs the tiles of uncached images."""

    def __init__(self, encoder: VisionEncoder, settings: ImageSettings, cache_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.encoder = encoder
        self.settings = settings
        self.max_pixels = max_pixels
        self.cache = FeatureCache(cache_size)

    def prepare(self, images: Sequence[ImagePart]) -> list[PreparedImage]:
        out, seen = [], {}
        for part in images:
            key = part.key
            layout = self.cache.layout(key)
            if layout is not None:
                out.append(PreparedImage(part, layout, None))
            elif key in seen:  # the same image twice in one request: tiled and encoded once
                out.append(PreparedImage(part, seen[key].layout, None))
            else:
                tiled = tile_image(load_image(part.source, self.max_pixels), self.settings)
                seen[key] = prepared = PreparedImage(part, Layout(tiled.rows, tiled.cols), tiled.tiles)
                out.append(prepared)
        return out

    def encode(self, prepared: Sequence[PreparedImage], stats: PerfStats,
               aborted: Callable[[], bool] = lambda: False) -> list[np.ndarray] | None:
        """Features per image, in order; None when ``aborted`` turned true between images."""
        out, local = [], {}
        for image in prepared:
            if aborted():
                return None
            key = image.part.key
            features = local.get(key)
            if features is None and image.tiles is None:
                cached = self.cache.get(key)
                features = cached[0] if cached else None
            if features is not None:
                stats.vision_cached_images += 1
            else:
                if image.tiles is None:  # evicted since prepare(): decode again
                    image.tiles = tile_image(load_image(image.part.source, self.max_pixels), self.settings).tiles
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
