"""The pre-queue checks of media bytes: an image's header and marker structure, a video's container,
each against the server's limits, without decoding a pixel or a frame — so a request that would fail
or blow up in the worker is refused before it may take a queue slot.

- ``check_image``: type, bytes, pixel count, side, decode memory and a JPEG's scan count
  (``rksmolvlm.processing.image_safety``).
- ``check_video``: bytes, then the container read (``rksmolvlm.processing.video.probe_video``): a video
  stream, its duration, frame count and frame size within the ``[video]`` limits.
- ``video_api_error``: a VideoError as the API answers it (also for the worker's decode failures).
"""

from __future__ import annotations

import contextvars
import functools
import io
from typing import TYPE_CHECKING, Callable

from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.media import IMAGE, IMAGE_TYPES, VIDEO

if TYPE_CHECKING:
    from rksmolvlm.errors import VideoError
    from rksmolvlm.runtime.jail.decoder import JailedDecoder

__all__ = ["MEDIA_CLIENT", "VIDEO_STATUS", "check_image", "check_video", "looks_like_video", "video_api_error",
           "video_decoder_available"]

# Who the checks run for (the server's client identity, set per request): jail children are shared among
# clients in turn, so one client's burst of bombs cannot hold every child while others wait.
MEDIA_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("rksmolvlm_media_client", default=None)
# A VideoError whose limit is the byte size is a 413, as an image over its byte limit; every other one a 400.
VIDEO_STATUS: dict[str | None, int] = {"max_bytes": 413}


def check_image(data: bytes, param: str, config: ServerConfig, decoder: "JailedDecoder | None" = None,
                client: str | None = None, deadline: float | None = None) -> None:
    """Type, size, pixel count, side, decode memory and a JPEG's scan count from the header and the
    marker structure only (rksmolvlm.processing.image_safety). With a ``decoder`` (the server's jail),
    only the byte checks run here; the child opens the image by ``deadline`` (time.monotonic(); default
    decode.probe_timeout_s from now)."""
    from PIL import Image, UnidentifiedImageError

    from rksmolvlm.errors import ImageError
    from rksmolvlm.processing.image_safety import check_decodable, check_jpeg

    limits = config.limits
    limit = limits.max_image_pixels
    if not data:
        raise ApiError(400, f"{param}: the image is empty (0 bytes): send the image file's contents",
                       "invalid_image", param)
    if len(data) > IMAGE.limit(config):
        raise IMAGE.too_large(config, len(data), param)
    if data[4:8] == b"ftyp" and data[8:12] in _IMAGE_BRANDS:  # typed by its bytes: Ollama's images carry no type
        raise ApiError(400, f"{param} is an AVIF or HEIF image ({data[8:12].decode('latin-1')!r}), which this server "
                       "does not decode: send a PNG, JPEG, WebP, GIF, BMP or TIFF image", "unsupported_image_type",
                       param)
    decode = limits.decode_limits()
    try:
        jpeg = check_jpeg(data, decode)  # before Pillow walks the markers itself: milliseconds, in front of the jail
        if decoder is not None:
            _jailed(lambda: decoder.inspect_image(data, decode, client or MEDIA_CLIENT.get(), deadline))
            return
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
            width, height = image.size
            if width * height <= limit:
                check_decodable(image, decode, jpeg, data)
    except ImageError as exc:
        if exc.code == "invalid_image" and exc.limit is None and looks_like_video(data):
            raise _video_as_image(param) from None
        key = _DECODE_LIMIT_KEYS.get(exc.limit)
        text = str(exc)
        if key and "over the limit of " in text:  # the processing layer's words, with the server's key in them
            text = text.replace("over the limit of ", f"over {key} = ", 1)
        elif key:
            text += f" (the server's {key})"
        raise ApiError(400, f"{param}: {text}", exc.code, param) from None
    except Image.DecompressionBombError:
        raise ApiError(400, f"{param} has more pixels than limits.max_image_pixels = {limit:,} (refused before "
                       "decoding): downscale it", "image_too_many_pixels", param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        if looks_like_video(data):
            raise _video_as_image(param) from None
        raise ApiError(400, f"{param} cannot be read as a PNG, JPEG, WebP, GIF, BMP or TIFF image: the data is "
                       "corrupt or in another format", "invalid_image", param) from None
    if width * height > limit:
        raise ApiError(400, f"{param} is {width}×{height} = {width * height:,} pixels, over "
                       f"limits.max_image_pixels = {limit:,}: downscale it", "image_too_many_pixels", param)


def check_video(data: bytes, param: str, config: ServerConfig, decoder: "JailedDecoder | None" = None,
                client: str | None = None, deadline: float | None = None) -> None:
    """Size, then the container read without decoding a frame (rksmolvlm.processing.video.probe_video):
    a video stream, its duration, frame count and frame size within the [video] limits. With a
    ``decoder`` (the server's jail) the container is read in a child, within decode.probe_timeout_s."""
    from rksmolvlm.errors import VideoError
    from rksmolvlm.processing.video import probe_video

    if not data:
        raise ApiError(400, f"{param}: the video is empty (0 bytes): send the video file's contents",
                       "invalid_video", param)
    if len(data) > VIDEO.limit(config):
        raise VIDEO.too_large(config, len(data), param)
    try:
        if decoder is not None:
            _jailed(lambda: decoder.inspect_video(data, config.video.limits(), client or MEDIA_CLIENT.get(), deadline))
        else:
            probe_video(data, config.video.limits())
    except VideoError as exc:
        raise video_api_error(exc, param) from None


def video_api_error(exc: VideoError, param: str | None) -> ApiError:
    """A VideoError as the API answers it: its code, 413 for the byte limit else 400, the message naming the
    server's config key of the limit it is over (a jail limit's key is in the message already)."""
    key = f" (the server's video.{exc.limit})" if exc.limit and "." not in exc.limit else ""
    where = f"{param}: " if param else ""
    return ApiError(VIDEO_STATUS.get(exc.limit, 400), f"{where}{exc}{key}", exc.code, param)


@functools.lru_cache(maxsize=1)
def video_decoder_available() -> bool:
    """PyAV is installed (looked up, not imported: the import is paid while the model loads)."""
    import importlib.util

    return importlib.util.find_spec("av") is not None


def looks_like_video(data: bytes) -> bool:
    """True when ``data`` starts like a video container (MP4/MOV/3GP, Matroska/WebM, AVI, FLV, MPEG-PS)."""
    if data[4:8] == b"ftyp":
        return data[8:12] not in _IMAGE_BRANDS
    return data.startswith(_VIDEO_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")


# ==============================================================================================
# Private helpers
# ==============================================================================================
def _jailed(check: Callable[[], object]) -> None:
    """``check()`` in the jail: every child busy for the whole wait is a 503, a stopping pool too."""
    from rksmolvlm.runtime.jail.decoder import DecoderBusyError, DecoderClosedError

    try:
        check()
    except DecoderBusyError as exc:
        raise ApiError(503, f"the server is busy checking other requests' media: {exc}", "decoder_busy",
                       headers={"Retry-After": "2"}) from None
    except DecoderClosedError:
        raise ApiError(503, "the server is shutting down: retry in a moment", "shutting_down",
                       headers={"Retry-After": "5"}) from None


def _video_as_image(param: str) -> ApiError:
    return ApiError(400, f"{param} is a video, not an image: send it as a video_url part of POST "
                    "/v1/chat/completions (the Ollama API has no field for videos)", "unsupported_image_type", param)


_PIL_FORMATS = tuple(sorted(set(IMAGE_TYPES.values())))
# The DecodeLimits field an image is over → the config key that sets it (in refusal messages).
_DECODE_LIMIT_KEYS: dict[str | None, str] = {"max_decode_bytes": "limits.max_decode_bytes",
                                             "max_jpeg_scans": "limits.max_jpeg_scans",
                                             "max_pixels": "limits.max_image_pixels",
                                             "max_tiff_strips": "limits.max_tiff_strips"}
# Leading bytes of video containers (ISO BMFF's ftyp box is checked apart): Matroska/WebM, AVI, FLV, MPEG-PS.
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"FLV\x01", b"\x00\x00\x01\xba")
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis", b"hevc", b"hevx")
