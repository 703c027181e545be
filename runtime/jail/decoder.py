"""The server's MediaDecoder: every decode of an untrusted image or clip runs in the jail's child
processes (``DecodePool``), answering only arrays of the size the request's plan allows.

Two lanes: ``inspect_image``/``inspect_video`` are the checks before a request is queued (lane
"check", ``decode.probe_timeout_s``); the MediaDecoder methods are the worker's decodes of the
request the model is on (lane "worker", which has a child of its own, so the checks of a burst of
new requests never hold up the running one). What a check learned (an image's display size, a
clip's container facts) is kept by content hash, so the worker does not probe the same bytes again.

A child that overruns its wall deadline, its address space (``decode.max_memory``) or its CPU time is
killed and replaced; the request gets ``image_too_complex``/``video_too_complex`` naming the limit.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np

from rksmolvlm.errors import ImageError, ImageTooComplexError, RkSmolVLMError, VideoError, VideoTooComplexError
from rksmolvlm.processing.content import ImagePart, VideoPart
from rksmolvlm.processing.image import ImageSettings, TiledImage
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.processing.video import VideoInfo, VideoLimits
from rksmolvlm.processing.video_frames import VideoSettings
from rksmolvlm.runtime.decoding import NEVER, InlineDecoder
from rksmolvlm.runtime.jail import (DecodePool, JailAborted, JailBusy, JailClosed, JailCrashed, JailError,
                                    JailProtocolError, JailTimeout)

__all__ = ["JailedDecoder", "DecoderBusyError", "DecoderClosedError"]

# CPU seconds a decode may use per second of its wall deadline: FFmpeg and Pillow decode on a few threads.
CPU_PER_WALL_SECOND = 4.0


class DecoderBusyError(RkSmolVLMError):
    """Every decoding child stayed busy for the whole wait (the server answers 503 with Retry-After)."""


class DecoderClosedError(RkSmolVLMError):
    """The pool is closed: the server is stopping."""


class JailedDecoder:
    """A MediaDecoder over a DecodePool. ``image_timeout_s``: the worker's decode of one image's pixels
    and tiles; a clip's reads are bounded by its ``VideoLimits.max_decode_seconds``."""

    def __init__(self, pool: DecodePool, *, probe_timeout_s: float = 10.0, image_timeout_s: float = 30.0,
                 max_memory: int | None = None, cache_size: int = 256):
        self.pool = pool
        self.probe_timeout_s = probe_timeout_s
        self.image_timeout_s = image_timeout_s
        self.max_memory = max_memory
        self._inline = InlineDecoder()  # for in-memory PIL images only: the caller's own objects
        self._facts: OrderedDict[str, tuple[int, int] | VideoInfo] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # -- before a request is queued (lane "check") ---------------------------------------------------
    def inspect_image(self, data: bytes, limits: DecodeLimits, client: str | None = None,
                      deadline: float | None = None) -> tuple[int, int]:
        """The image's display size once the child has opened it and found it within ``limits``, by
        ``deadline`` (time.monotonic(); default: decode.probe_timeout_s from now)."""
        key = _digest(data)
        size = self._recall(key)
        if isinstance(size, tuple):
            return size
        answer = self._run(ImageError, "image.probe", {"limits": asdict(limits)}, data, self._left(deadline),
                           self._probe_key, "check", client)
        size = _size(answer.result)
        self._remember(key, size)
        return size

    def inspect_video(self, data: bytes, limits: VideoLimits, client: str | None = None,
                      deadline: float | None = None) -> VideoInfo:
        """The clip's container facts once the child has read them within ``limits``, by ``deadline``."""
        key = _digest(data)
        info = self._recall(key)
        if isinstance(info, VideoInfo):
            return info
        answer = self._run(VideoError, "video.probe", {"limits": asdict(limits)}, data,
                           min(self._left(deadline), limits.max_decode_seconds), self._probe_key, "check", client)
        info = _video_info(answer.result, limits)
        self._remember(key, info)
        return info

    # -- the worker's decodes (lane "worker"): the MediaDecoder contract ------------------------------
    def image_size(self, part: ImagePart, limits: DecodeLimits) -> tuple[int, int]:
        if _in_memory(part):
            return self._inline.image_size(part, limits)
        size = self._recall(part.key)
        if isinstance(size, tuple):
            return size
        answer = self._run(ImageError, "image.probe", {"limits": asdict(limits)}, part.data(), self.image_timeout_s,
                           self._image_key, "worker", None)
        size = _size(answer.result)
        self._remember(part.key, size)
        return size

    def tile(self, part: ImagePart, settings: ImageSettings, limits: DecodeLimits,
             aborted: Callable[[], bool] = NEVER) -> TiledImage | None:
        if _in_memory(part):
            return self._inline.tile(part, settings, limits, aborted)
        try:
            answer = self._run(ImageError, "image.tile", {"limits": asdict(limits), "settings": settings.to_dict()},
                               part.data(), self.image_timeout_s, self._image_key, "worker", None, aborted)
        except JailAborted:
            return None
        rows, cols = int(answer.result["rows"]), int(answer.result["cols"])
        return TiledImage(answer.arrays[0], rows, cols)

    def probe_video(self, part: VideoPart, limits: VideoLimits) -> VideoInfo:
        info = self._recall(part.key)
        if isinstance(info, VideoInfo):
            return info
        answer = self._run(VideoError, "video.probe", {"limits": asdict(limits)}, part.data(),
                           limits.max_decode_seconds, _video_key(limits), "worker", None)
        info = _video_info(answer.result, limits)
        self._remember(part.key, info)
        return info

    def video_frames(self, part: VideoPart, indices: Sequence[int], settings: VideoSettings, limits: VideoLimits,
                     aborted: Callable[[], bool] = NEVER) -> np.ndarray | None:
        params = {"limits": asdict(limits), "indices": [int(i) for i in indices], "settings": settings.to_dict()}
        try:
            answer = self._run(VideoError, "video.frames", params, part.data(), limits.max_decode_seconds,
                               _video_key(limits), "worker", None, aborted)
        except JailAborted:
            return None
        return answer.arrays[0]

    def snapshot(self) -> dict:
        return self.pool.snapshot()

    def close(self) -> None:
        self.pool.close()

    # -- private ----------------------------------------------------------------------------------
    @property
    def _probe_key(self) -> str:
        return f"decode.probe_timeout_s = {self.probe_timeout_s:g} s for all of a request's media"

    @property
    def _image_key(self) -> str:
        return f"decode.image_timeout_s = {self.image_timeout_s:g} s"

    def _left(self, deadline: float | None) -> float:
        """Seconds until ``deadline`` (at least a moment: a check out of time is refused by its child's deadline)."""
        if deadline is None:
            return self.probe_timeout_s
        return max(0.05, deadline - time.monotonic())

    def _run(self, error: type[ImageError] | type[VideoError], op: str, params: dict, payload: bytes,
             deadline_s: float, deadline_key: str, lane: str, client: str | None,
             aborted: Callable[[], bool] = NEVER):
        """``op`` in a child; a jail failure as ``error``'s too-complex refusal naming the limit it hit
        (JailAborted passes through: the caller returns None)."""
        complex_error = ImageTooComplexError if error is ImageError else VideoTooComplexError
        what = "image" if error is ImageError else "video"
        try:
            return self.pool.run(op, params, bytes(payload), deadline_s=deadline_s,
                                 cpu_s=max(1.0, deadline_s * CPU_PER_WALL_SECOND), lane=lane, client=client,
                                 aborted=aborted)
        except JailTimeout:
            raise complex_error(f"decoding the {what} took longer than its time allows ({deadline_key}): send a "
                                f"smaller or simpler {what}", limit=deadline_key.split(" ", 1)[0]) from None
        except JailCrashed as exc:
            memory = f"{self.max_memory / 2**20:,.0f} MiB of memory (decode.max_memory)" if self.max_memory else \
                "its memory allowance (decode.max_memory)"
            raise complex_error(f"decoding the {what} needed more than {memory} or its CPU time, and was stopped "
                                f"({exc}): send a smaller or simpler {what}", limit="decode.max_memory") from None
        except JailProtocolError as exc:
            raise complex_error(f"decoding the {what} gave an answer outside what was asked ({exc}), and was "
                                f"stopped: send a standard {what} file", limit=None) from None
        except JailBusy:
            raise DecoderBusyError(f"every decoding process stayed busy for {deadline_s:.3g} s (decode.workers = "
                                   f"{self.pool.snapshot().get('workers')}): retry in a moment") from None
        except JailClosed:
            raise DecoderClosedError("the server is shutting down: retry in a moment") from None
        except JailAborted:
            raise
        except JailError as exc:  # any other jail failure: the media's fault as far as the client can tell
            raise complex_error(f"decoding the {what} failed in its jail ({exc}): send a standard {what} file",
                                limit=None) from None

    def _recall(self, key: str):
        with self._lock:
            value = self._facts.get(key)
            if value is not None:
                self._facts.move_to_end(key)
            return value

    def _remember(self, key: str, value) -> None:
        with self._lock:
            self._facts[key] = value
            self._facts.move_to_end(key)
            while len(self._facts) > self._cache_size:
                self._facts.popitem(last=False)


# ==============================================================================================
# Private helpers
# ==============================================================================================
def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()  # what ImagePart.key / VideoPart.key compute of the same bytes


def _size(result: dict) -> tuple[int, int]:
    width, height = result.get("width"), result.get("height")
    if not (type(width) is int and type(height) is int and width > 0 and height > 0):
        raise ImageTooComplexError("decoding the image gave no valid size: send a standard image file")
    return width, height


def _video_key(limits: VideoLimits) -> str:
    return f"video.max_decode_seconds = {limits.max_decode_seconds:g} s"


def _in_memory(part: ImagePart) -> bool:
    """A PIL image the caller built itself (not bytes or a path): decoded in this process."""
    return not isinstance(part.source, (bytes, bytearray, str)) and not hasattr(part.source, "__fspath__")


def _video_info(result: dict, limits: VideoLimits) -> VideoInfo:
    """The child's facts, each of its type and within ``limits`` (a compromised child could send anything)."""
    try:
        info = VideoInfo(**{name: result[name] for name in VideoInfo.__dataclass_fields__})
    except (KeyError, TypeError):
        info = None
    if info is None or not (
            type(info.total_num_frames) is int and 0 < info.total_num_frames <= limits.max_stream_frames
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in (info.duration, info.fps)) and 0 <= info.duration <= limits.max_duration_seconds
            and info.fps > 0 and all(type(v) is int and 0 < v <= limits.max_side for v in (info.width, info.height))
            and all(isinstance(v, str) and len(v) <= 64 for v in (info.codec, info.pix_fmt, info.color_range,
                                                                 info.color_space))
            and type(info.rotation) is int):
        raise VideoTooComplexError("reading the video gave facts outside its limits: send a standard video file")
    return info
