"""Typed errors. Every message names the problem and the fix; the CLI prints them without a trace."""

from __future__ import annotations


class RkSmolVLMError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 2


class CheckpointError(RkSmolVLMError):
    """The model source is not a usable SmolVLM checkpoint."""


class TargetError(RkSmolVLMError):
    """An unknown target platform or an invalid target × dtype combination."""


class CalibrationError(RkSmolVLMError):
    """A calibration set that cannot be read or is empty."""


class ToolkitMissingError(RkSmolVLMError):
    """A vendor toolkit or runtime library is not installed."""


class ToolkitFailedError(RkSmolVLMError):
    """A vendor toolkit call returned an error code."""


class AccuracyError(RkSmolVLMError):
    """A converted model scored below the accuracy floor."""

    exit_code = 3


class BundleError(RkSmolVLMError):
    """A bundle that is missing, incomplete, tampered with or from an incompatible version."""


class ImageError(RkSmolVLMError):
    """An image that cannot be decoded or is out of the allowed limits. ``code`` is the error code
    the server answers with (HTTP 400); each refusal before decoding has a subclass of its own."""

    code = "invalid_image"

    def __init__(self, *args, limit: str | None = None):
        super().__init__(*args)
        self.limit = limit  # the DecodeLimits field the image is over, if any (e.g. "max_jpeg_scans")


class ImageTooManyPixelsError(ImageError):
    """An image with more pixels than the limit, refused from its header."""

    code = "image_too_many_pixels"


class ImageDecodeTooLargeError(ImageError):
    """An image whose decode would take more memory than the budget (by mode and size), or whose
    side is longer than any the decoder takes."""

    code = "image_decode_too_large"


class ImageTooComplexError(ImageError):
    """An image that is cheap to send and costly to decode: a JPEG with too many scans or segments,
    or a decode that outlived its time budget."""

    code = "image_too_complex"


class VideoError(RkSmolVLMError):
    """A video that cannot be read or is out of the allowed limits. ``code`` is the error code the
    server answers with (HTTP 400); each kind of refusal has a subclass of its own."""

    code = "invalid_video"

    def __init__(self, *args, limit: str | None = None):
        super().__init__(*args)
        self.limit = limit  # the VideoLimits field the video is over, if any (e.g. "max_duration_seconds")


class VideoTooLongError(VideoError):
    """A video whose duration or frame count is over the limit (from the header or the packet scan)."""

    code = "video_too_long"


class VideoTooLargeError(VideoError):
    """A video with too many bytes, or frames with too many pixels or too long a side."""

    code = "video_too_large"


class VideoTooComplexError(VideoError):
    """A video whose reading outlived its time budget or needed too many container packets."""

    code = "video_too_complex"


class UnsupportedVideoError(VideoError):
    """A video we cannot decode exactly as the reference does: codec, pixel format or bit depth,
    odd frame size, rotation, colour matrix, or a stream that changes these mid-way."""

    code = "unsupported_video"


class NoVideoStreamError(VideoError):
    """A readable media file without a video stream (audio only, subtitles only, cover art only)."""

    code = "no_video_stream"
