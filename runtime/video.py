"""Videos → frame features (SmolVLM2): probe, sample, decode, resize, encode, with features cached per
frame.

``plan`` reads only the container's packet index (cheap, bounded by the limits) and chooses the frames
exactly as transformers' ``SmolVLMVideoProcessor.sample_frames`` does, so the prompt (timestamps, frame
count) and the context check are known before any frame is decoded. ``encode`` decodes only the frames
whose features are not cached, resizes them in the two stages transformers uses (exact ports, see
``rksmolvlm/processing/video_frames.py``) and sends them through the vision engine as unsplit tiles in
one call (the NPU engine spreads them over its cores).

Sampling settings per request (``VideoPart.fps``/``max_frames``) are bounded by the checkpoint's: at
most its ``max_frames``; the runner's defaults (``VideoOptions``) choose fewer frames for latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from rksmolvlm.processing.assembler import VideoLayout
from rksmolvlm.processing.content import VideoPart
from rksmolvlm.processing.video import VideoInfo, VideoLimits
from rksmolvlm.processing.video_frames import VideoSettings, frame_timestamps, sample_indices
from rksmolvlm.runtime.decoding import InlineDecoder, MediaDecoder
from rksmolvlm.runtime.engines import PerfStats, VisionEncoder
from rksmolvlm.runtime.vision import FeatureCache

__all__ = ["VideoOptions", "VideoPlan", "VideoEncoder", "DEFAULT_BOARD_MAX_FRAMES"]

# Frames a video gets unless the request asks otherwise: 16 unsplit tiles ≈ 1,100 prompt tokens on
# 256M/500M and 16 tower passes spread over the NPU cores (the checkpoints' own 64 frames would fill
# a 4,096-token context on their own).
DEFAULT_BOARD_MAX_FRAMES = 16
# Frames sent to the vision engine at once: a whole batch spreads over the NPU cores, and a cancelled
# request is heard between batches (64 frames of a 2.2B tower take seconds).
ENCODE_BATCH = 16


@dataclass(frozen=True)
class VideoOptions:
    """The runner's video defaults: frames per second to sample (None: the checkpoint's) and the
    most frames per video (None: the checkpoint's; always at most the checkpoint's)."""

    fps: float | None = None
    max_frames: int | None = DEFAULT_BOARD_MAX_FRAMES
    limits: VideoLimits = VideoLimits()
    cache_frames: int = 256  # frame features kept (a second question about a clip decodes nothing)


@dataclass
class VideoPlan:
    part: VideoPart
    info: VideoInfo
    indices: np.ndarray  # the sampled frame indices (presentation order)
    layout: VideoLayout
    keys: list[str]  # feature-cache key per sampled frame


class VideoEncoder:
    """The video side of a request."""

    def __init__(self, encoder: VisionEncoder, settings: VideoSettings, options: VideoOptions | None = None,
                 decoder: MediaDecoder | None = None):
        self.encoder = encoder
        self.settings = settings
        self.options = options or VideoOptions()
        self.decoder: MediaDecoder = decoder or InlineDecoder()
        self.cache = FeatureCache(self.options.cache_frames)

    def sampling(self, part: VideoPart) -> tuple[float, int]:
        """(fps, max_frames) for ``part``: its own, else the runner's, else the checkpoint's; max_frames
        never above the checkpoint's."""
        fps = part.fps or self.options.fps or self.settings.fps
        wanted = part.max_frames or self.options.max_frames or self.settings.max_frames
        return float(fps), int(min(wanted, self.settings.max_frames))

    def plan(self, part: VideoPart) -> VideoPlan:
        fps, max_frames = self.sampling(part)
        info = self.decoder.probe_video(part, self.options.limits)
        indices = sample_indices(info.total_num_frames, info.duration, info.fps, fps, max_frames,
                                 self.settings.skip_secs)
        timestamps = tuple(float(t) for t in frame_timestamps(indices, info.fps))
        keys = [f"{part.key}:frame{int(i)}:{self.settings.frame_size}" for i in indices]
        return VideoPlan(part, info, np.asarray(indices), VideoLayout(timestamps, float(info.duration)), keys)

    def encode(self, plans: Sequence[VideoPlan], stats: PerfStats,
               aborted: Callable[[], bool] = lambda: False) -> list[np.ndarray] | None:
        """Features per video ((frames, seq, hidden)), in order; None when ``aborted`` turned true."""
        out: list[np.ndarray] = []
        for plan in plans:
            if aborted():
                return None
            features: list[np.ndarray | None] = []
            for key in plan.keys:
                cached = self.cache.get(key)
                features.append(cached[0] if cached else None)
            missing = [k for k, f in enumerate(features) if f is None]
            stats.video_cached_frames += len(plan.keys) - len(missing)
            if missing:
                start = time.perf_counter()
                tiles = self._frames(plan, missing, aborted)
                stats.video_decode_ms += (time.perf_counter() - start) * 1000
                if tiles is None or aborted():
                    return None
                for first in range(0, len(tiles), ENCODE_BATCH):  # an abort is heard between batches
                    if first and aborted():
                        return None
                    batch = tiles[first:first + ENCODE_BATCH]
                    start = time.perf_counter()
                    encoded = self.encoder.encode_frames(batch)
                    stats.vision_ms += (time.perf_counter() - start) * 1000
                    stats.vision_tiles += len(batch)
                    stats.video_frames += len(batch)
                    for k, row in zip(missing[first:first + ENCODE_BATCH], encoded):
                        features[k] = frame = row[None]
                        self.cache.put(plan.keys[k], frame, None)
            out.append(np.concatenate([f for f in features if f is not None]))  # all filled by now
        return out

    def _frames(self, plan: VideoPlan, wanted: list[int], aborted: Callable[[], bool]) -> np.ndarray | None:
        """The model's frames (uint8 (n, S, S, 3)) of the sampled frames ``wanted`` (positions in the plan)."""
        indices = [int(plan.indices[k]) for k in wanted]
        return self.decoder.video_frames(plan.part, indices, self.settings, self.options.limits, aborted)
