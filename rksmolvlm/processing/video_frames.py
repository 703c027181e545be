"""SmolVLM2 video frames after decoding, exactly as transformers 5.24's ``SmolVLMVideoProcessor``.

Depends on numpy only. What transformers does (``models/smolvlm/video_processing_smolvlm.py``):

- sampling (``sample_frames``): ``desired = max(1, min(int(round(fps·duration)), max_frames))``; the whole
  clip, or without ``skip_secs`` at both ends when ``duration − 2·skip_secs > max_frames·fps``;
  ``unique(linspace(start, end, desired, dtype=int))``. A frame's timestamp is ``index / video_fps``.
- resizing: stage 1 to a longest edge of ``size.longest_edge`` (the short side ``int(L / aspect)``, rounded
  up to even, everything capped at 4096), stage 2 squashed to ``max_image_size × max_image_size``; both
  torchvision's uint8 antialiased Lanczos (``rksmolvlm.processing.lanczos``), an unchanged size is no resize.
- normalisation, fused: ``(x − mean/rescale) / (std/rescale)`` in float32, (N, 3, S, S).

The frames are unsplit tiles: the board feeds the uint8 (N, S, S, 3) frames to the vision tower;
``normalize_frames`` gives the float pixel values transformers would give (host preview, parity).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rksmolvlm.processing.lanczos import resize_uint8_chain

__all__ = [
    "MAX_IMAGE_SIZE",
    "VideoSettings",
    "frame_timestamps",
    "longest_edge_size",
    "normalize_frames",
    "resize_frames",
    "sample_indices",
]

MAX_IMAGE_SIZE = 4096  # transformers caps stage 1 at 4k on its longest edge
LANCZOS = 1  # PILImageResampling.LANCZOS, the only filter transformers' video path is matched for

# SmolVLMVideoProcessor's class defaults (used when the checkpoint's config leaves a key out)
_DEFAULT_FRAME_SIZE = 364
_DEFAULT_MEAN = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN
_DEFAULT_STD = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_STD
_DEFAULT_RESCALE = 1 / 255


@dataclass(frozen=True)
class VideoSettings:
    """The video processor settings of one SmolVLM2 checkpoint, as the bundle manifest stores them.

    ``fps``/``max_frames``: sampling (``video_sampling``); ``skip_secs``: seconds left out at both ends of
    long clips (transformers always uses 1); ``longest_edge``: stage 1 (the processor's ``size``);
    ``frame_size``: stage 2, the vision tile (``max_image_size``); mean/std/rescale: normalisation.
    """

    fps: float
    max_frames: int
    longest_edge: int
    frame_size: int
    skip_secs: float = 1.0
    image_mean: tuple[float, float, float] = _DEFAULT_MEAN
    image_std: tuple[float, float, float] = _DEFAULT_STD
    rescale_factor: float = _DEFAULT_RESCALE

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.fps) and self.fps > 0):
            problems.append(f"fps {self.fps} (must be above 0)")
        if int(self.max_frames) != self.max_frames or self.max_frames < 1:
            problems.append(f"max_frames {self.max_frames} (must be a whole number of at least 1)")
        for name in ("longest_edge", "frame_size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                problems.append(f"{name} {value} (must be a whole number of pixels, at least 1)")
        if not (math.isfinite(self.skip_secs) and self.skip_secs >= 0):
            problems.append(f"skip_secs {self.skip_secs} (must be 0 or more)")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                problems.append(f"{name} {value} (must be three finite numbers)")
        if len(self.image_std) == 3 and not all(self.image_std):
            problems.append(f"image_std {self.image_std} (a zero divides by zero)")
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            problems.append(f"rescale_factor {self.rescale_factor} (must be above 0)")
        if problems:
            raise ValueError("invalid video settings: " + "; ".join(problems)
                             + ". Fix the checkpoint's video processor config or convert the bundle again")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for the bundle manifest."""
        return {"fps": float(self.fps), "max_frames": int(self.max_frames), "skip_secs": float(self.skip_secs),
                "longest_edge": int(self.longest_edge), "frame_size": int(self.frame_size),
                "image_mean": [float(v) for v in self.image_mean], "image_std": [float(v) for v in self.image_std],
                "rescale_factor": float(self.rescale_factor)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoSettings:
        """The inverse of ``to_dict``; every key is required."""
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise ValueError(f"video settings lack {', '.join(missing)}: the manifest is incomplete; convert the "
                             "bundle again")
        return cls(fps=float(d["fps"]), max_frames=_whole(d["max_frames"], "max_frames"),
                   longest_edge=_whole(d["longest_edge"], "longest_edge"),
                   frame_size=_whole(d["frame_size"], "frame_size"), skip_secs=float(d["skip_secs"]),
                   image_mean=_triple(d["image_mean"], "image_mean"), image_std=_triple(d["image_std"], "image_std"),
                   rescale_factor=float(d["rescale_factor"]))

    @classmethod
    def from_preprocessor(cls, pre: dict[str, Any]) -> VideoSettings:
        """The settings ``SmolVLMVideoProcessor(**pre)`` ends up with, from the checkpoint's
        (video_)preprocessor_config.json: ``video_sampling`` gives fps and max_frames; its ``video_size`` is
        replaced by ``size`` when the config has one (so stage 1 is ``size.longest_edge``); ``max_image_size``
        is stage 2. skip_secs stays 1: transformers never reads it from the config. Settings transformers' video
        path would apply differently than we do are refused."""
        sampling = pre.get("video_sampling")
        if sampling is None:
            raise ValueError("the preprocessor config has no 'video_sampling': not a SmolVLM2 video checkpoint")
        if not isinstance(sampling, dict):
            raise TypeError(f"'video_sampling' is {sampling!r}, not an object")
        for key in ("fps", "max_frames"):
            if sampling.get(key) is None:
                raise ValueError(f"'video_sampling' has no '{key}'")
        size = pre["size"] if "size" in pre else sampling.get("video_size")
        if not isinstance(size, dict) or not size.get("longest_edge"):
            raise ValueError(f"the video size {size!r} is not {{'longest_edge': N}}: only longest-edge resizing "
                             "(every SmolVLM2 checkpoint's) is supported")
        frame = pre.get("max_image_size") or {"longest_edge": _DEFAULT_FRAME_SIZE}
        if not isinstance(frame, dict) or not frame.get("longest_edge"):
            raise ValueError(f"'max_image_size' {frame!r} is not {{'longest_edge': N}}")
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if pre.get(key) is False:
                raise ValueError(f"'{key}' is false: only SmolVLM2's resize + rescale + normalise is supported")
        if pre.get("resample", LANCZOS) != LANCZOS:
            raise ValueError(f"'resample' {pre['resample']!r} is not LANCZOS (1): only SmolVLM2's Lanczos resize is "
                             "reproduced")
        return cls(fps=float(sampling["fps"]), max_frames=_whole(sampling["max_frames"], "max_frames"),
                   longest_edge=_whole(size["longest_edge"], "size.longest_edge"),
                   frame_size=_whole(frame["longest_edge"], "max_image_size.longest_edge"),
                   image_mean=_triple(pre.get("image_mean", _DEFAULT_MEAN), "image_mean"),
                   image_std=_triple(pre.get("image_std", _DEFAULT_STD), "image_std"),
                   rescale_factor=float(pre.get("rescale_factor", _DEFAULT_RESCALE)))


def sample_indices(total_num_frames: int, duration: float, video_fps: float, fps: float, max_frames: int,
                   skip_secs: float = 1.0) -> np.ndarray:
    """The frame indices transformers' ``SmolVLMVideoProcessor.sample_frames`` picks (int64, ascending,
    unique) for a clip of ``total_num_frames`` frames, ``duration`` seconds at ``video_fps``, sampled at
    ``fps`` frames per second and at most ``max_frames`` frames."""
    if int(total_num_frames) != total_num_frames or total_num_frames < 1:
        raise ValueError(f"the video has {total_num_frames} frames: there is nothing to sample")
    for name, value in (("duration", duration), ("video fps", video_fps), ("sampling fps", fps)):
        if value is None or not math.isfinite(value):
            raise ValueError(f"the {name} is {value}: a video needs a known, finite {name} to be sampled")
    if duration < 0 or video_fps <= 0:
        raise ValueError(f"the video reports {duration} s at {video_fps} fps: a broken container; re-encode it")
    if fps <= 0:
        raise ValueError(f"sampling fps {fps}: ask for more than 0 frames per second")
    if int(max_frames) != max_frames or max_frames < 1:
        raise ValueError(f"max_frames {max_frames}: ask for at least one frame")
    total_num_frames, max_frames = int(total_num_frames), int(max_frames)
    # Python floats throughout (an int fps gives the same products); round() of a float is an int, half to even
    duration, video_fps, fps, skip_secs = float(duration), float(video_fps), float(fps), float(skip_secs)
    desired = max(1, min(round(fps * duration), max_frames))
    start, end = 0, total_num_frames - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):  # max_frames, not desired
        start = int(skip_secs * video_fps)
        end = int(total_num_frames - skip_secs * video_fps)
    start = max(0, start)
    end = min(end, total_num_frames - 1)
    if start >= end:
        start, end = 0, total_num_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=np.int64))  # truncating, like dtype=int


def frame_timestamps(indices: np.ndarray, video_fps: float) -> np.ndarray:
    """Seconds of each sampled frame, as transformers' ``VideoMetadata.timestamps``: index / fps (float64)."""
    if video_fps is None or not (math.isfinite(video_fps) and video_fps > 0):
        raise ValueError(f"the video fps is {video_fps}: frame timestamps need a known fps above 0")
    return np.asarray(indices, dtype=np.int64) / float(video_fps)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Stage 1's (height, width): transformers' smolvlm ``get_resize_output_image_size``."""
    longest_edge = min(MAX_IMAGE_SIZE, longest_edge)
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def resize_frames(frames: np.ndarray, settings: VideoSettings, workers: int = 1) -> np.ndarray:
    """Decoded RGB frames, uint8 (N, H, W, 3), to the model's frames, uint8 (N, S, S, 3) with S =
    ``settings.frame_size``: stage 1 to the longest edge, stage 2 squashed square, exactly as transformers.
    ``workers`` > 1 resizes that many frames at a time on threads (numpy and BLAS release the GIL)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize_frames takes decoded RGB frames as uint8 (N, H, W, 3), got {frames.dtype} "
                         f"{frames.shape}: decode the video to RGB24")
    n, height, width, _ = frames.shape
    if height < 1 or width < 1:
        raise ValueError(f"the frames are {width}x{height} pixels: the video has no picture")
    size = settings.frame_size
    stages = [longest_edge_size(height, width, settings.longest_edge), (size, size)]
    out = np.empty((n, size, size, 3), np.uint8)

    def one(i: int) -> None:  # one frame at a time: stage 1 of a long clip would not fit in memory at once
        out[i] = resize_uint8_chain(frames[i], stages)

    if workers > 1 and n > 1:
        with ThreadPoolExecutor(max_workers=min(workers, n)) as pool:
            list(pool.map(one, range(n)))
    else:
        for i in range(n):
            one(i)
    return out


def normalize_frames(frames: np.ndarray, settings: VideoSettings | None = None) -> np.ndarray:
    """uint8 (N, S, S, 3) frames to float32 pixel values (N, 3, S, S), as transformers' fused rescale +
    normalise: ``(x − m) / s`` with m = float32(mean)·float32(1/rescale) and s likewise for std (the
    settings' mean/std/rescale; SmolVLM2's 0.5/0.5/255 give ``(x − 127.5) / 127.5``)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"normalize_frames takes uint8 (N, S, S, 3) frames, got {frames.dtype} {frames.shape}")
    mean = settings.image_mean if settings else _DEFAULT_MEAN
    std = settings.image_std if settings else _DEFAULT_STD
    rescale = settings.rescale_factor if settings else _DEFAULT_RESCALE
    # torch multiplies the float32 mean/std tensors by the Python float 1/rescale in float32
    inverse = np.float32(1.0 / rescale)
    m = (np.asarray(mean, np.float32) * inverse).reshape(1, 3, 1, 1)
    s = (np.asarray(std, np.float32) * inverse).reshape(1, 3, 1, 1)
    out = frames.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    out -= m
    out /= s
    return out


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"'{name}' is {value!r}: it must be a whole number")
    return int(value)


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3  # transformers broadcasts a single number over the channels
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"'{name}' is {value!r}: it must be one number or three")
    return float(value[0]), float(value[1]), float(value[2])
