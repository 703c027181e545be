"""Media decoding as the runner sees it: what an image's size is, its tiles, a video's container facts
and its sampled frames — one contract (``MediaDecoder``) with two rooms behind it.

- ``InlineDecoder`` decodes in this process (the CLI's ``ask``/``chat``, verify, bench: the user's own
  files). Its decode of one image cannot be interrupted; a video is read a batch of frames at a time
  with ``aborted`` checked between batches.
- ``rksmolvlm.runtime.jail.JailedDecoder`` (the server) runs every decode in a child process with hard
  limits (address space, CPU time, a wall deadline, no network) and kills it on abort or overrun: an
  untrusted image or clip can cost at most the child.

Every method raises the ``rksmolvlm.errors`` ImageError/VideoError subclass that names a refusal; the
decoding methods return None when ``aborted()`` turned true (the request was cancelled).
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.processing.content import ImagePart, VideoPart
from rksmolvlm.processing.image import ImageSettings, TiledImage, image_size, load_image, tile_image
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.processing.video import VideoInfo, VideoLimits, VideoReader, probe_video
from rksmolvlm.processing.video_frames import VideoSettings, resize_frames

__all__ = ["MediaDecoder", "InlineDecoder", "DecodeAborted", "DECODE_BATCH", "decode_frames", "NEVER"]

DECODE_BATCH = 8  # frames decoded and resized at a time: a 4K clip's 64 frames would take 1.6 GB at once


def NEVER() -> bool:  # noqa: N802 - a constant-like default for ``aborted``
    return False


class DecodeAborted(RkSmolVLMError):
    """The request was cancelled while its media were decoded (the runner answers finish_reason "abort")."""


class MediaDecoder(Protocol):
    """What the runner asks of a decoder. ``limits`` are the encoders' (per runner); ``aborted`` is the
    request's cancel flag."""

    def image_size(self, part: ImagePart, limits: DecodeLimits) -> tuple[int, int]:
        """(width, height) as ``load_image`` gives it (EXIF orientation applied): exact, or predicted from
        the header where that is all a cheap read tells (a PNG's eXIf chunk after the pixels)."""
        ...

    def tile(self, part: ImagePart, settings: ImageSettings, limits: DecodeLimits,
             aborted: Callable[[], bool] = NEVER) -> TiledImage | None:
        """The image decoded and tiled exactly as transformers' processor with ``settings`` does."""
        ...

    def probe_video(self, part: VideoPart, limits: VideoLimits) -> VideoInfo:
        """The container's facts (packet scan, no frame decoded): ``processing.video.probe_video``."""
        ...

    def video_frames(self, part: VideoPart, indices: Sequence[int], settings: VideoSettings, limits: VideoLimits,
                     aborted: Callable[[], bool] = NEVER) -> np.ndarray | None:
        """The model's frames (uint8 (len(indices), S, S, 3), S = settings.frame_size) of the frames at
        ``indices`` (presentation order, ascending)."""
        ...

    def close(self) -> None:
        ...


class InlineDecoder:
    """Decodes in this process (trusted input: the user's own files)."""

    def image_size(self, part: ImagePart, limits: DecodeLimits) -> tuple[int, int]:
        size = image_size(part.source)
        if size is None:  # an unreadable header: decode now (load_image names the problem)
            size = load_image(part.source, limits=limits).size
        return size

    def tile(self, part: ImagePart, settings: ImageSettings, limits: DecodeLimits,
             aborted: Callable[[], bool] = NEVER) -> TiledImage | None:
        if aborted():
            return None
        return tile_image(load_image(part.source, limits=limits), settings)

    def probe_video(self, part: VideoPart, limits: VideoLimits) -> VideoInfo:
        return probe_video(part.source, limits)

    def video_frames(self, part: VideoPart, indices: Sequence[int], settings: VideoSettings, limits: VideoLimits,
                     aborted: Callable[[], bool] = NEVER) -> np.ndarray | None:
        return decode_frames(part.source, indices, settings, limits, aborted)

    def close(self) -> None:
        pass


def decode_frames(source, indices: Sequence[int], settings: VideoSettings, limits: VideoLimits,
                  aborted: Callable[[], bool] = NEVER) -> np.ndarray | None:
    """The model's frames at ``indices``: decoded in order, a batch at a time, each batch resized before
    the next is decoded (the jail's child runs this too). None when ``aborted`` turned true."""
    size = settings.frame_size
    out = np.empty((len(indices), size, size, 3), np.uint8)
    with VideoReader(source, limits) as reader:
        for start in range(0, len(indices), DECODE_BATCH):
            if aborted():
                return None
            batch = [int(i) for i in indices[start:start + DECODE_BATCH]]
            out[start:start + len(batch)] = resize_frames(reader.read_frames(batch), settings)
    return out
