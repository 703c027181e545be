"""Video → metadata and RGB frames, bit for bit what transformers' default video backend gives on x86.

transformers loads SmolVLM2 videos with torchcodec (``read_video_torchcodec``: exact seek mode,
``get_frames_at(indices)``). What that gives, and what this module reproduces without torch:

- Metadata from an exact-mode packet scan of the best video stream: frames = the packets not
  flagged discard; duration = max(pts + duration) − min(pts), each side ``float(pts) * num / den``;
  fps = frames / duration (the header's average rate when the duration is 0).
- Frame ``i`` = the frame with the i-th smallest pts (presentation order).
- Colour conversion on CPU by FFmpeg's swscale special converter for yuv420p → rgb24 (x86 SSSE3,
  16-bit fixed point, chroma nearest-neighbour), with the frame's colour matrix (BT.601 / BT.709 /
  FCC / SMPTE 240M / BT.2020 tables) and range (frame tag; untagged yuvj formats are full range),
  then the display-matrix rotation (lossless 90° turns). ``yuv420p_to_rgb`` is that converter in
  numpy, so the board (ARM, whose FFmpeg converter differs by up to 3) gives the host's frames:
  the decoded YUV planes are identical on every architecture for the codecs allowed here.

Everything else is refused with a named ``VideoError`` before the costly step: the bytes before
opening, the frame size and format from the stream header before decoding, the duration and
frame count from the header before the packet scan and during it. Decoding jumps to the keyframe
before a wanted frame when that skips frames, stops after the last wanted frame, keeps only the
wanted frames, and checks the time budget between packets. Bytes never touch the disk. One
``VideoReader`` serves one thread at a time. Depends on numpy and PyAV (imported when a video is
opened).
"""

from __future__ import annotations

import io
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO

import numpy as np

from rksmolvlm.errors import (
    NoVideoStreamError,
    UnsupportedVideoError,
    VideoError,
    VideoTooComplexError,
    VideoTooLargeError,
    VideoTooLongError,
)

__all__ = ["CONTAINER_FORMATS", "SUPPORTED_CODECS", "VideoInfo", "VideoLimits", "VideoReader", "probe_video",
           "read_frames", "yuv420p_to_rgb"]

# Codecs whose decoders are bit-exact by specification: the YUV planes match on x86 and ARM and
# across FFmpeg versions. MPEG-2/MPEG-4 part 2/MJPEG are not (their IDCT is implementation-defined).
SUPPORTED_CODECS = ("h264", "hevc", "vp8", "vp9", "av1")
# Demuxers av.open may pick (FFmpeg format_whitelist): MP4/MOV, Matroska/WebM, AVI — containers whose
# index seeks land on the keyframe asked for. Playlists (HLS, concat) are never opened.
CONTAINER_FORMATS = ("mov", "matroska", "avi")
_PIX_FMTS = ("yuv420p", "yuvj420p")
_FULL_RANGE_FORMATS = ("yuvj420p",)
# Seeking flushes the decoder (its reorder buffer and threads in flight): only worth it when the
# keyframe before the next wanted frame is further ahead than this many frames.
_SEEK_MIN_GAIN = 16

_COLOR_SPACE_NAMES = {0: "gbr", 1: "bt709", 2: "unknown", 3: "reserved", 4: "fcc", 5: "bt470bg", 6: "smpte170m",
                      7: "smpte240m", 8: "ycgco", 9: "bt2020nc", 10: "bt2020c", 11: "smpte2085",
                      12: "chroma-derived-nc", 13: "chroma-derived-c", 14: "ictcp", 15: "ipt-c2",
                      16: "ycgco-re", 17: "ycgco-ro"}
_COLOR_RANGE_NAMES = {0: "unknown", 1: "tv", 2: "pc"}
_AVCOL_SPC_RGB = 0
_AVCOL_RANGE_MPEG, _AVCOL_RANGE_JPEG = 1, 2

# libswscale's ff_yuv2rgb_coeffs (crv, cbu, cgu, cgv) in 16.16, indexed by AVColorSpace; any other
# value (2 unspecified, 5 bt470bg, 6 smpte170m, 8, > 10) falls back to BT.601 like sws_getCoefficients.
_BT601 = (104597, 132201, 25675, 53279)
_SWS_COEFFS = {1: (117489, 138438, 13975, 34925), 4: (104448, 132798, 24759, 53109),
               7: (117579, 136230, 16907, 35559), 9: (110013, 140363, 12277, 42626),
               10: (110013, 140363, 12277, 42626)}

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_DURATION_SECONDS = 1800.0
DEFAULT_MAX_STREAM_FRAMES = 108_000  # 30 minutes at 60 fps
DEFAULT_MAX_FRAME_PIXELS = 3840 * 2160
DEFAULT_MAX_SIDE = 4096
DEFAULT_MAX_DECODE_SECONDS = 60.0
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class VideoLimits:
    """The limits one video must fit; each is checked before the step it protects.

    ``max_bytes``: the file or request body, before opening. ``max_frame_pixels``/``max_side``: the
    frame size from the stream header, before decoding (also passed to FFmpeg's stream probe as its
    decoder's pixel cap). ``max_duration_seconds``/``max_stream_frames``: the header's claims before
    the packet scan, then the scan itself (it stops at ``max_stream_frames`` packets). ``max_decode_seconds``:
    wall time of everything one ``VideoReader`` does (open, scan, decode), checked between packets.
    ``max_output_bytes``: the RGB frames one ``read_frames`` call returns (read fewer frames per call)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_duration_seconds: float = DEFAULT_MAX_DURATION_SECONDS
    max_stream_frames: int = DEFAULT_MAX_STREAM_FRAMES
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_decode_seconds: float = DEFAULT_MAX_DECODE_SECONDS
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES


@dataclass(frozen=True)
class VideoInfo:
    """What transformers' torchcodec loader reports (``VideoMetadata``): ``total_num_frames``,
    ``duration`` (seconds) and ``fps`` from the packet scan, ``width``/``height`` of the returned
    frames (after rotation); plus the stream's codec, the decoded pixel format, the first frame's
    colour range and matrix names (FFmpeg's spellings) and its display rotation (degrees,
    counter-clockwise)."""

    total_num_frames: int
    duration: float
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str
    color_range: str
    color_space: str
    rotation: int = 0


Source = bytes | bytearray | memoryview | str | os.PathLike


class VideoReader:
    """One opened video: limits checked, packets scanned, first frame decoded. ``info`` is its
    metadata; ``read_frames`` decodes frames by index and may be called again (later indices
    continue from the decoder's position). Use as a context manager, or call ``close``."""

    def __init__(self, source: Source, limits: VideoLimits = VideoLimits(), *, threads: int = 0):
        import av  # the board path's only decoder; imported here so the rest of the package needs no PyAV

        self._av = av
        self._limits = limits
        self._deadline = time.monotonic() + limits.max_decode_seconds
        self._file = _open_source(source, limits, self._deadline)
        self._container: Any = None  # av's InputContainer once open (PyAV is imported lazily, untyped here)
        self._packets: Any = None  # the demuxer's packets (a generator) from the last seek on
        self._queue: deque = deque()  # decoded frames not yet looked at
        self._seeked = False  # no frame decoded since the last seek to a keyframe
        self._no_seek = False  # seeking proved unreliable here: decode from the start instead
        self._last_index = -1  # the last frame index returned (or the position before the seek target)
        self._rotation: int | None = None
        self._last_pts: int | None = None  # of the last frame the decoder gave since the last seek
        try:
            self._open(threads)
        except BaseException:
            self.close()
            raise

    # -- public ----------------------------------------------------------------------------

    def read_frames(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The frames at ``indices`` (presentation order, any order, repeats allowed) as a uint8
        array (n, height, width, 3) RGB, exactly as torchcodec's ``get_frames_at`` returns them."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.info.total_num_frames
        if wanted.size and (wanted.min() < 0 or wanted.max() >= n):
            raise ValueError(f"frame indices must be in [0, {n}), got {wanted.min()}..{wanted.max()}")
        unique, inverse = np.unique(wanted, return_inverse=True)
        frame_bytes = self.info.width * self.info.height * 3
        if unique.size * frame_bytes > self._limits.max_output_bytes:
            raise VideoTooLargeError(
                f"{unique.size} frames of {self.info.width}x{self.info.height} take "
                f"{unique.size * frame_bytes / 2**20:.0f} MiB, over the {self._limits.max_output_bytes / 2**20:.0f} "
                "MiB limit: read fewer frames per call or send a lower-resolution video",
                limit="max_output_bytes")
        out = np.empty((unique.size, self.info.height, self.info.width, 3), np.uint8)
        for slot, index in enumerate(unique.tolist()):
            self._decode_into(index, out[slot])
        if unique.size == wanted.size and np.array_equal(unique, wanted):
            return out
        return out[inverse]

    def close(self) -> None:
        if self._packets is not None:
            self._packets.close()
            self._packets = None
        if self._container is not None:
            self._container.close()
            self._container = None
        self._file.close()  # idempotent; closing frees the bytes of an in-memory video

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- opening -----------------------------------------------------------------------------

    def _open(self, threads: int) -> None:
        av, limits = self._av, self._limits
        options = {
            "format_whitelist": ",".join(CONTAINER_FORMATS),
            "protocol_whitelist": "none",  # no nested opens (references, playlists)
            # the stream probe decodes a frame: cap its size (coded sizes are padded, hence the slack)
            "max_pixels": str(2 * limits.max_frame_pixels + 65536),
        }
        try:
            self._container = av.open(self._file, mode="r", options=options, metadata_errors="ignore")
        except av.error.FFmpegError as exc:
            self._file.check()
            raise VideoError(
                f"the video could not be opened ({_reason(exc)}): send an MP4/MOV, MKV/WebM or AVI file "
                f"with {', '.join(SUPPORTED_CODECS).upper()} video") from exc
        self._file.check()
        stream = self._container.streams.best("video")
        if stream is None or stream.disposition & av.stream.Disposition.attached_pic:
            kinds = sorted({s.type for s in self._container.streams}) or ["no streams"]
            raise NoVideoStreamError(
                f"the file has no video stream (it holds: {', '.join(kinds)}): send a video file")
        self._stream = stream
        codec = stream.codec_context
        if codec is None:  # FFmpeg has no decoder for it
            raise UnsupportedVideoError(
                "the video's codec is unknown to the decoder: re-encode the video as H.264")
        self._check_header(stream, codec)
        for other in self._container.streams:
            if other.index != stream.index:
                try:
                    other.discard = av.stream.Discard.all  # the demuxer skips their packets (PyAV >= 17.1)
                except (AttributeError, TypeError):
                    pass
        codec.thread_type = "AUTO"
        codec.thread_count = threads
        total, duration, fps = self._scan()
        first = self._first_frame()
        rotation = _rotation_degrees(first)
        width, height = first.width, first.height
        if rotation in (90, -90):
            width, height = height, width
        self._rotation = rotation
        self.info = VideoInfo(total_num_frames=total, duration=duration, fps=fps, width=width, height=height,
                              codec=codec.codec.canonical_name, pix_fmt=first.format.name,
                              color_range=_COLOR_RANGE_NAMES.get(first.color_range, str(first.color_range)),
                              color_space=_COLOR_SPACE_NAMES.get(first.colorspace, str(first.colorspace)),
                              rotation=rotation)

    def _check_header(self, stream, codec) -> None:
        limits = self._limits
        width, height = codec.width, codec.height
        self._size = (width, height)  # every decoded frame must have it (checked before any limit trips)
        if width <= 0 or height <= 0:
            raise VideoError(
                "the video stream's frame size is unknown: its first frame could not be decoded "
                f"(corrupt, or more than {limits.max_frame_pixels} pixels): send a video FFmpeg can play")
        if max(width, height) > limits.max_side:
            raise VideoTooLargeError(
                f"the video's frames are {width}x{height}, longer than {limits.max_side} pixels on a side: "
                "send a smaller video", limit="max_side")
        if width * height > limits.max_frame_pixels:
            raise VideoTooLargeError(
                f"the video's frames are {width}x{height} ({width * height} pixels), over the "
                f"{limits.max_frame_pixels}-pixel limit: send a smaller video", limit="max_frame_pixels")
        if codec.codec.canonical_name not in SUPPORTED_CODECS:
            raise UnsupportedVideoError(
                f"video codec '{codec.codec.canonical_name}' is not supported (only {', '.join(SUPPORTED_CODECS)} "
                "decode identically on every CPU): re-encode the video as H.264")
        pix_fmt = codec.format.name if codec.format is not None else None
        if pix_fmt is not None:
            _check_pix_fmt(pix_fmt)
        if width % 2 or height % 2:
            raise UnsupportedVideoError(
                f"the video's frame size {width}x{height} is odd: re-encode it with an even width and height")
        if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
            header_seconds = float(stream.duration * stream.time_base)
        elif self._container.duration is not None and self._container.duration > 0:
            header_seconds = self._container.duration / 1_000_000
        else:
            header_seconds = 0.0
        if header_seconds > limits.max_duration_seconds:
            raise VideoTooLongError(
                f"the video is {header_seconds:.0f} s long (its header says), over the "
                f"{limits.max_duration_seconds:.0f} s limit: send a shorter clip", limit="max_duration_seconds")
        if stream.frames > limits.max_stream_frames:
            raise VideoTooLongError(
                f"the video has {stream.frames} frames (its header says), over the {limits.max_stream_frames}-frame "
                "limit: send a shorter clip", limit="max_stream_frames")

    def _scan(self) -> tuple[int, float, float]:
        """torchcodec's exact-mode scan: every non-discard packet of the stream is a frame."""
        limits, stream = self._limits, self._stream
        pts: list[int] = []
        keys: list[int] = []
        first = last = None
        packets = self._container.demux(stream)
        try:
            for packet in packets:
                self._check_time("scanning the video's packets")
                if packet.size == 0 and packet.pts is None and packet.dts is None:
                    continue  # PyAV's end-of-stream flush packet, not read from the file
                if packet.is_discard:
                    continue
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    raise UnsupportedVideoError(
                        "the video's packets carry no timestamps: remux it into MP4 or MKV "
                        "(ffmpeg -i in -c copy out.mp4)")
                if len(pts) >= limits.max_stream_frames:
                    raise VideoTooLongError(
                        f"the video has more than {limits.max_stream_frames} frames: send a shorter clip",
                        limit="max_stream_frames")
                pts.append(t)
                if packet.is_keyframe:
                    keys.append(t)
                end = t + (packet.duration or 0)
                first = t if first is None else min(first, t)
                last = end if last is None else max(last, end)
        except self._av.error.FFmpegError as exc:
            raise VideoError(f"the video's container is corrupt ({_reason(exc)}): send an intact file") from exc
        finally:
            packets.close()
        self._file.check()
        self._check_time("scanning the video's packets")
        if not pts:
            raise VideoError("the video stream has no frames: send a video with at least one frame")
        assert first is not None and last is not None  # set with the first of pts
        tb = stream.time_base
        begin = float(first) * tb.numerator / tb.denominator
        duration = float(last) * tb.numerator / tb.denominator - begin
        if duration > limits.max_duration_seconds:
            raise VideoTooLongError(
                f"the video is {duration:.0f} s long, over the {limits.max_duration_seconds:.0f} s limit: "
                "send a shorter clip", limit="max_duration_seconds")
        if duration != 0:
            fps = len(pts) / duration
        elif stream.average_rate:
            fps = float(stream.average_rate)
        else:
            raise VideoError("the video has no duration and no frame rate: send a video with timestamps")
        self._pts = np.sort(np.asarray(pts, np.int64), kind="stable")
        self._key_pts = np.sort(np.asarray(keys, np.int64))
        return len(pts), duration, fps

    def _first_frame(self):
        """Decode from the start to the first frame: its real format, colours and rotation."""
        self._seek(None)
        frame = self._next_decoded()
        if frame is None:
            raise VideoError("the video's first frame could not be decoded: send an intact file")
        self._queue.appendleft(frame)  # read_frames starts with it
        return frame

    # -- decoding ----------------------------------------------------------------------------

    def _decode_into(self, index: int, out: np.ndarray) -> None:
        target = int(self._pts[index])
        key = self._keyframe_position(target)
        if index <= self._last_index or (key is not None and key > self._last_index + _SEEK_MIN_GAIN):
            self._seek(target)
        frame = self._next_frame_at(target)
        if frame is None and self._seeked:
            # the seek landed past the frame (an index that does not match the stream): start over
            self._no_seek = True
            self._seek(None)
            frame = self._next_frame_at(target)
        if frame is None:
            raise VideoError(f"frame {index} of the video could not be decoded (truncated or corrupt stream): "
                             "send an intact file")
        self._last_index = index
        self._convert(frame, out)

    def _keyframe_position(self, target: int) -> int | None:
        """Where, in presentation order, the last keyframe at or before ``target`` is."""
        at = int(np.searchsorted(self._key_pts, target, side="right")) - 1
        if at < 0:
            return None
        return int(np.searchsorted(self._pts, self._key_pts[at], side="left"))

    def _seek(self, target: int | None) -> None:
        """Position the demuxer on the keyframe at or before ``target`` (None: the start) and
        reset the decoder, as torchcodec does before a frame it is not next to."""
        if self._packets is not None:
            self._packets.close()
        try:
            if target is None or self._no_seek:
                self._container.seek(0)
                self._seeked = False
                self._last_index = -1
            else:
                at = int(np.searchsorted(self._key_pts, target, side="right")) - 1
                seek_pts = int(self._key_pts[at]) if at >= 0 else target
                self._container.seek(seek_pts, stream=self._stream, backward=True, any_frame=False)
                self._seeked = True
                self._last_index = int(np.searchsorted(self._pts, seek_pts, side="left")) - 1
        except self._av.error.FFmpegError as exc:
            raise VideoError(f"the video cannot be rewound or seeked ({_reason(exc)}): remux it into MP4 "
                             "(ffmpeg -i in -c copy out.mp4)") from exc
        self._stream.codec_context.flush_buffers()
        self._packets = self._container.demux(self._stream)
        self._queue.clear()
        self._last_pts = None

    def _next_frame_at(self, target: int):
        """The next decoded frame whose pts is at or after ``target`` (torchcodec's rule), or None
        when a seek overshot it or the stream ended first."""
        while (frame := self._next_decoded()) is not None:
            t = frame.pts if frame.pts is not None else frame.dts
            if t is None:
                continue
            if self._seeked and t > target:
                return None
            self._seeked = False
            if t >= target:
                return frame
        return None

    def _next_decoded(self):
        """The decoder's next frame in presentation order, or None at the end of the stream."""
        av, codec = self._av, self._stream.codec_context
        try:
            while not self._queue:
                self._check_time("decoding the video")
                packet = next(self._packets, None)
                if packet is None:
                    return None
                if packet.size == 0 and packet.pts is None and packet.dts is None:
                    frames = codec.decode(None)  # end of stream: drain the decoder
                else:
                    frames = codec.decode(packet)
                self._file.check()
                for frame in frames:
                    self._check_frame(frame)
                    self._check_order(frame)
                self._queue.extend(frames)
        except av.error.FFmpegError as exc:
            self._file.check()
            raise VideoError(f"the video stream is corrupt ({_reason(exc)}): send an intact file") from exc
        return self._queue.popleft()

    def _check_frame(self, frame) -> None:
        _check_pix_fmt(frame.format.name)
        if (frame.width, frame.height) != self._size:
            raise UnsupportedVideoError(
                f"the video changes frame size mid-stream ({self._size[0]}x{self._size[1]} → "
                f"{frame.width}x{frame.height}): re-encode it at one size")
        if frame.colorspace == _AVCOL_SPC_RGB:
            raise UnsupportedVideoError(
                "the video's 4:2:0 frames are tagged with the RGB colour matrix: re-encode it with a YUV matrix "
                "(BT.709 or BT.601)")
        if self._rotation is not None and _rotation_degrees(frame) != self._rotation:
            raise UnsupportedVideoError("the video changes rotation mid-stream: re-encode it upright")

    def _check_order(self, frame) -> None:
        """Decoders give frames in presentation order; when the timestamps say otherwise (an AVI
        with B-frames carries decode times only) frame i is not the i-th smallest pts."""
        t = frame.pts if frame.pts is not None else frame.dts
        if t is None:
            return
        if self._last_pts is not None and t < self._last_pts:
            raise UnsupportedVideoError(
                "the video's frame timestamps run backwards (an AVI with B-frames?): remux it into MP4 "
                "(ffmpeg -i in -c copy out.mp4)")
        self._last_pts = t

    def _check_time(self, doing: str) -> None:
        if time.monotonic() > self._deadline:
            raise VideoTooComplexError(
                f"{doing} took longer than {self._limits.max_decode_seconds:g} s: send a shorter or "
                "lower-resolution video", limit="max_decode_seconds")

    def _convert(self, frame, out: np.ndarray) -> None:
        y, u, v = (_plane(frame, i) for i in range(3))
        if frame.color_range in (_AVCOL_RANGE_MPEG, _AVCOL_RANGE_JPEG):
            full = frame.color_range == _AVCOL_RANGE_JPEG
        else:
            full = frame.format.name in _FULL_RANGE_FORMATS  # untagged: swscale's default for the format
        rotation = self._rotation  # set from the first frame, before any conversion
        if rotation == 0:
            yuv420p_to_rgb(y, u, v, colorspace=frame.colorspace, full_range=full, out=out)
            return
        rgb = yuv420p_to_rgb(y, u, v, colorspace=frame.colorspace, full_range=full)
        # FFmpeg's transpose=cclock / transpose=clock / hflip,vflip: lossless turns
        out[...] = np.rot90(rgb, k={90: 1, -90: -1, 180: 2}[rotation or 0])


def probe_video(source: Source, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """The video's metadata as transformers' torchcodec loader reports it (see ``VideoInfo``),
    or a ``VideoError`` subclass naming why it is refused."""
    with VideoReader(source, limits) as reader:
        return reader.info


def read_frames(source: Source, indices: Sequence[int] | np.ndarray, limits: VideoLimits = VideoLimits(), *,
                threads: int = 0) -> np.ndarray:
    """The frames at ``indices`` (presentation order) as uint8 (n, height, width, 3) RGB, bit for bit
    torchcodec's ``get_frames_at(indices)`` on x86 (NHWC instead of its NCHW)."""
    with VideoReader(source, limits, threads=threads) as reader:
        return reader.read_frames(indices)


def yuv420p_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, *, colorspace: int = 2, full_range: bool = False,
                   out: np.ndarray | None = None) -> np.ndarray:
    """8-bit 4:2:0 planes (y: H×W, u/v: H/2×W/2, H and W even) → uint8 H×W×3 RGB, exactly as
    FFmpeg's x86 SSSE3 yuv420p→rgb24 converter: per pixel, with 16-bit ``pmulhw`` products,
    Y' = ((8·Y − y_offset)·y_coeff) >> 16, U' = 8·U − 1024, V' = 8·V − 1024,
    R = clip(Y' + (V'·vr) >> 16), G = clip(Y' + (U'·ug) >> 16 + (V'·vg) >> 16), B = clip(Y' + (U'·ub) >> 16),
    each chroma sample serving its 2×2 block. ``colorspace`` is FFmpeg's AVColorSpace number."""
    height, width = y.shape
    if height % 2 or width % 2 or u.shape != (height // 2, width // 2) or v.shape != u.shape:
        raise ValueError(f"planes must be H×W and H/2×W/2 with H, W even; got {y.shape}, {u.shape}, {v.shape}")
    luma, vr, guv, ub = _tables(_SWS_COEFFS.get(colorspace, _BT601), bool(full_range))
    if out is None:
        out = np.empty((height, width, 3), np.uint8)
    elif out.shape != (height, width, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(height, width, 3)}")
    half = height // 2
    y_terms = np.take(luma, y).reshape(half, 2, width)  # the two rows sharing a chroma row
    pixels = out.reshape(half, 2, width, 3)
    uv = np.left_shift(u, 8, dtype=np.uint16)
    np.bitwise_or(uv, v, out=uv)
    total = np.empty((half, 2, width), np.int16)
    term = np.empty((half, width), np.int16)
    for channel, chroma in enumerate((np.take(vr, v), np.take(guv, uv), np.take(ub, u))):
        term.reshape(half, width // 2, 2)[...] = chroma[:, :, None]  # each chroma sample serves 2 columns
        np.add(y_terms, term[:, None, :], out=total)
        np.clip(total, 0, 255, out=pixels[..., channel], casting="unsafe")
    return out


# -- helpers ------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _tables(coeffs: tuple[int, int, int, int], full_range: bool) -> tuple[np.ndarray, ...]:
    """Per-level terms of the converter as int16 lookup tables (luma; red from V; green from U and V
    together, indexed u << 8 | v; blue from U), from libswscale's
    ff_yuv2rgb_c_init_tables (contrast = saturation = 1 << 16, brightness 0): the 16.16 matrix is
    scaled for the range, then rounded to the SIMD code's 3.13 (y, chroma) and 13.3 (offset) fixed point."""
    crv, cbu, cgu, cgv = coeffs[0], coeffs[1], -coeffs[2], -coeffs[3]
    cy, oy = 1 << 16, 0
    if full_range:
        crv, cbu, cgu, cgv = (_c_div(c * 224, 255) for c in (crv, cbu, cgu, cgv))
    else:
        cy, oy = (cy * 255) // 219, 16 << 16
    # contrast and saturation 1.0 in 16.16: (c * 65536 * 65536) >> 32 leaves them as they are
    y_coeff, y_offset = _round_int16(cy << 13), _round_int16(oy << 3)
    vr_coeff, ub_coeff = _round_int16(crv << 13), _round_int16(cbu << 13)
    vg_coeff, ug_coeff = _round_int16(cgv << 13), _round_int16(cgu << 13)
    levels = np.arange(256, dtype=np.int32)
    chroma = levels * 8 - 1024
    luma = (_wrap_int16(levels * 8 - y_offset) * y_coeff) >> 16
    green = ((chroma * ug_coeff) >> 16)[:, None] + ((chroma * vg_coeff) >> 16)[None, :]  # [u, v]: index u << 8 | v
    return tuple(t.astype(np.int16) for t in (luma, (chroma * vr_coeff) >> 16, green.reshape(-1),
                                              (chroma * ub_coeff) >> 16))


def _c_div(a: int, b: int) -> int:
    """C's integer division (truncates toward zero), for the negative green coefficients."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _round_int16(f: int) -> int:
    """libswscale's roundToInt16: 16.16 → nearest integer, saturated to int16."""
    r = (f + (1 << 15)) >> 16
    return -0x8000 if r < -0x7FFF else min(r, 0x7FFF)


def _wrap_int16(a: np.ndarray) -> np.ndarray:
    return ((a + 0x8000) & 0xFFFF) - 0x8000


def _plane(frame, index: int) -> np.ndarray:
    plane = frame.planes[index]
    height = frame.height if index == 0 else frame.height // 2
    width = frame.width if index == 0 else frame.width // 2
    rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
    return rows[:height, :width]


def _check_pix_fmt(pix_fmt: str) -> None:
    if pix_fmt not in _PIX_FMTS:
        raise UnsupportedVideoError(
            f"video pixel format '{pix_fmt}' is not supported (only 8-bit 4:2:0, yuv420p): re-encode the video "
            "with -pix_fmt yuv420p")


def _rotation_degrees(frame) -> int:
    """The frame's display-matrix rotation, as torchcodec rounds it (0, 90, -90 or 180)."""
    degrees = float(frame.rotation or 0)
    turns = round(degrees / 90)
    if abs(degrees - 90 * turns) > 1e-6:
        raise UnsupportedVideoError(
            f"the video is rotated by {degrees:g} degrees, not a multiple of 90: re-encode it upright")
    return {0: 0, 1: 90, -1: -90, 2: 180, -2: 180}[turns]


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or type(exc).__name__


class _BoundedFile(io.RawIOBase):
    """The source as a read-only seekable file for PyAV, in memory for bytes. Reads stop (end of
    file) once the time budget is spent; ``check`` then raises, since FFmpeg reports a failed read
    as the end of the file."""

    def __init__(self, raw, deadline: float, budget: float):
        super().__init__()
        self._raw = raw
        self._deadline = deadline
        self._budget = budget
        self._expired = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if time.monotonic() > self._deadline:
            self._expired = True
            return 0
        return self._raw.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def check(self) -> None:
        if self._expired:
            raise VideoTooComplexError(
                f"reading the video took longer than {self._budget:g} s: send a shorter or smaller video",
                limit="max_decode_seconds")

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_source(source: Source, limits: VideoLimits, deadline: float) -> _BoundedFile:
    raw: BinaryIO
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        raw = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        try:
            # a plain file, closed by the reader: FFmpeg never sees the name (no URLs or protocols)
            raw = open(source, "rb")  # noqa: SIM115
            size = os.fstat(raw.fileno()).st_size
        except OSError as exc:
            raise VideoError(f"the video file {os.fspath(source)!r} cannot be read ({exc.strerror or exc}): "
                             "check the path") from exc
    else:
        raise TypeError(f"a video source is bytes or a path, not {type(source).__name__}")
    if size == 0:
        raw.close()
        raise VideoError("the video is empty (0 bytes): send the file's content")
    if size > limits.max_bytes:
        raw.close()
        raise VideoTooLargeError(
            f"the video is {size / 2**20:.1f} MiB, over the {limits.max_bytes / 2**20:.0f} MiB limit: "
            "send a shorter or more compressed clip", limit="max_bytes")
    return _BoundedFile(raw, deadline, limits.max_decode_seconds)
