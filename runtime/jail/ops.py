"""What a jail child can be asked to do, and what each op may answer.

Each op is a pure function of its params and the media bytes, built on ``rksmolvlm.processing`` exactly
as the in-process paths use it (so its answer is byte-equal to theirs):

- ``image.probe``: the pre-queue check (JPEG structure, header, decode budget) and the display size
  ``load_image`` would give → ``{"width", "height"}``.
- ``image.tile``: ``tile_image(load_image(...))`` → ``{"rows", "cols"}`` + tiles uint8 (N, T, T, 3).
- ``video.probe``: ``probe_video`` → the VideoInfo fields.
- ``video.frames``: the frames at ``indices`` decoded a batch at a time and resized (as
  ``runtime/video.py``'s VideoEncoder) → frames uint8 (len(indices), S, S, 3).
- ``diagnose``: the child's limits and whether the network is closed to it.

The parent side uses ``prepare`` (params checked and completed before a child sees them) and
``expected_shapes`` (the answer's result checked and the only array shapes it may declare, computed
before a byte of payload is read). The child side uses ``run``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import numpy as np

from rksmolvlm.errors import ImageError, ImageTooManyPixelsError, VideoError
from rksmolvlm.processing.image import MAX_IMAGE_SIZE

__all__ = ["OPS", "MAX_FRAME_INDICES", "prepare", "expected_shapes", "error_family", "run"]

OPS = ("image.probe", "image.tile", "video.probe", "video.frames", "diagnose")
MAX_FRAME_INDICES = 1024


def prepare(op: str, params: Mapping[str, Any]) -> dict:
    """``params`` checked and completed with defaults (ValueError/TypeError naming the field: a caller
    bug, raised before any child is used)."""
    if op not in OPS:
        raise ValueError(f"unknown jail op {op!r}: use one of {', '.join(OPS)}")
    if not isinstance(params, Mapping):
        raise TypeError(f"{op} params must be a dict, not {type(params).__name__}")
    out = dict(params)
    if op.startswith("image."):
        out["limits"] = _limits(_decode_limits_class(), params.get("limits"), op)
    elif op.startswith("video."):
        out["limits"] = _limits(_video_limits_class(), params.get("limits"), op)
    if op == "image.tile":
        out["settings"] = _image_settings(params.get("settings"), op).to_dict()
    if op == "video.frames":
        out["settings"] = _video_settings(params.get("settings"), op).to_dict()
        indices = params.get("indices")
        if (not isinstance(indices, (list, tuple)) or not indices or len(indices) > MAX_FRAME_INDICES
                or not all(_whole(i) and i < 2**31 for i in indices)):
            raise ValueError(f"video.frames indices must be 1 to {MAX_FRAME_INDICES} whole numbers ≥ 0, got "
                             f"{str(indices)[:80]}: ask for fewer frames per call")
        out["indices"] = [int(i) for i in indices]
    return out


def expected_shapes(op: str, params: Mapping[str, Any], result: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """The exact array shapes ``op`` may answer with this ``result`` (ValueError naming what the result
    gets wrong). ``params`` are the prepared ones."""
    if op == "image.probe":
        _exact_keys(result, ("width", "height"), op)
        width, height = _positive(result, "width", 2**31), _positive(result, "height", 2**31)
        if width * height > params["limits"]["max_pixels"]:
            raise ValueError(f"{op} answered {width}×{height}, over the max_pixels it was given")
        return []
    if op == "image.tile":
        _exact_keys(result, ("rows", "cols"), op)
        settings = params["settings"]
        tile, longest = settings["tile_size"], min(settings["longest_edge"], MAX_IMAGE_SIZE)
        most = longest // tile + 1 if settings["do_image_splitting"] else 0  # tile_image caps the image at 4096
        rows, cols = _count(result, "rows", most), _count(result, "cols", most)
        if (rows == 0) != (cols == 0):
            raise ValueError(f"{op} answered {rows} rows and {cols} cols (both or neither must be 0)")
        return [(1 if rows == 0 else rows * cols + 1, tile, tile, 3)]
    if op == "video.probe":
        _check_video_info(result, params["limits"])
        return []
    if op == "video.frames":
        _exact_keys(result, (), op)
        size = params["settings"]["frame_size"]
        return [(len(params["indices"]), size, size, 3)]
    if op == "diagnose":
        _exact_keys(result, _DIAGNOSE_KEYS, op)
        for key in ("pid", "as_limit", "fsize_limit", "cpu_soft", "socket_errno"):
            if not (_whole(result[key]) or result[key] == -1):
                raise ValueError(f"diagnose answered {key} = {str(result[key])[:40]}, not a whole number")
        if not isinstance(result["no_network"], bool) or not _short_str(result["seccomp"], 200):
            raise ValueError("diagnose answered no_network or seccomp of the wrong type")
        return []
    raise ValueError(f"unknown jail op {op!r}")


def error_family(op: str) -> tuple[type[Exception], ...]:
    """The error classes ``op`` may answer with (an image op cannot answer a VideoError)."""
    if op.startswith("image."):
        return (ImageError,)
    if op.startswith("video."):
        return (VideoError,)
    return ()


def run(op: str, params: Mapping[str, Any], payload: bytes, context: Mapping[str, Any]
        ) -> tuple[dict, list[np.ndarray]]:
    """Run one op in the child: (result, arrays). ``context`` is what ``diagnose`` reports of the sandbox."""
    if op == "image.probe":
        return _image_probe(payload, params), []
    if op == "image.tile":
        return _image_tile(payload, params)
    if op == "video.probe":
        from rksmolvlm.processing.video import VideoLimits, probe_video

        return asdict(probe_video(payload, VideoLimits(**params["limits"]))), []
    if op == "video.frames":
        return {}, [_video_frames(payload, params)]
    if op == "diagnose":
        return _diagnose(context), []
    raise ValueError(f"unknown jail op {op!r}")


# ==============================================================================================
# Private helpers
# ==============================================================================================
_DIAGNOSE_KEYS = ("pid", "as_limit", "fsize_limit", "cpu_soft", "no_network", "seccomp", "socket_errno")
_VIDEO_INFO_TEXT = ("codec", "pix_fmt", "color_range", "color_space")


def _decode_limits_class():
    from rksmolvlm.processing.image_safety import DecodeLimits

    return DecodeLimits


def _video_limits_class():
    from rksmolvlm.processing.video import VideoLimits

    return VideoLimits


def _limits(cls, given: Any, op: str) -> dict:
    if given is None:
        return asdict(cls())
    if not isinstance(given, Mapping):
        raise TypeError(f"{op} limits must be a dict of {cls.__name__} fields, not {type(given).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{op} limits has unknown fields {unknown}: use {sorted(known)}")
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{op} limits.{key} = {value!r} must be a number ≥ 0")
    return asdict(cls(**given))


def _image_settings(given: Any, op: str):
    from rksmolvlm.processing.image import ImageSettings

    if not isinstance(given, Mapping):
        raise TypeError(f"{op} needs settings = ImageSettings.to_dict(), not {type(given).__name__}")
    settings = ImageSettings.from_dict(dict(given))
    if not (_whole(settings.tile_size) and settings.tile_size >= 1 and _whole(settings.longest_edge)
            and settings.longest_edge >= 1):
        raise ValueError(f"{op} settings need whole tile_size and longest_edge ≥ 1, got {settings.tile_size}, "
                         f"{settings.longest_edge}")
    return settings


def _video_settings(given: Any, op: str):
    from rksmolvlm.processing.video_frames import VideoSettings

    if not isinstance(given, Mapping):
        raise TypeError(f"{op} needs settings = VideoSettings.to_dict(), not {type(given).__name__}")
    return VideoSettings.from_dict(dict(given))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _exact_keys(result: Mapping[str, Any], keys, op: str) -> None:
    if set(result) != set(keys):
        raise ValueError(f"{op} answered the fields {sorted(map(str, result))[:10]}, not {sorted(keys)}")


def _positive(result: Mapping[str, Any], key: str, most: int) -> int:
    value = result[key]
    if not _whole(value) or not 1 <= value <= most:
        raise ValueError(f"the answer's {key} = {str(value)[:40]} is not a whole number in [1, {most}]")
    return value


def _count(result: Mapping[str, Any], key: str, most: int) -> int:
    value = result[key]
    if not _whole(value) or value > most:
        raise ValueError(f"the answer's {key} = {str(value)[:40]} is not a whole number in [0, {most}]")
    return value


def _short_str(value: Any, most: int) -> bool:
    return isinstance(value, str) and len(value) <= most


def _check_video_info(result: Mapping[str, Any], limits: Mapping[str, Any]) -> None:
    from rksmolvlm.processing.video import SUPPORTED_CODECS, VideoInfo

    from .wire import finite_number

    _exact_keys(result, [f.name for f in fields(VideoInfo)], "video.probe")
    frames = result["total_num_frames"]
    if not _whole(frames) or frames > limits["max_stream_frames"]:
        raise ValueError(f"video.probe answered total_num_frames = {str(frames)[:40]}")
    for key in ("duration", "fps"):
        if not finite_number(result[key]) or result[key] < 0:
            raise ValueError(f"video.probe answered {key} = {str(result[key])[:40]}, not a finite number ≥ 0")
    for key in ("width", "height"):
        _positive(result, key, int(limits["max_side"]))
    if result["codec"] not in SUPPORTED_CODECS:
        raise ValueError(f"video.probe answered codec {str(result['codec'])[:40]!r}, not one it accepts")
    if not all(_short_str(result[key], 40) for key in _VIDEO_INFO_TEXT):
        raise ValueError("video.probe answered a name that is not a short string")
    rotation = result["rotation"]
    if not isinstance(rotation, int) or isinstance(rotation, bool) or rotation % 90 or abs(rotation) > 360:
        raise ValueError(f"video.probe answered rotation = {str(rotation)[:40]}")


def _image_probe(data: bytes, params: Mapping[str, Any]) -> dict:
    """runtime/server/media_checks.check_image's Pillow part, then the display size."""
    from PIL import Image

    from rksmolvlm.processing.image import IMAGE_FORMATS, image_size, load_image
    from rksmolvlm.processing.image_safety import DecodeLimits, check_decodable, check_jpeg

    limits = DecodeLimits(**params["limits"])
    if not data:
        raise ImageError("the image is empty (0 bytes): send the image file's contents")
    try:
        jpeg = check_jpeg(data, limits)  # before Pillow walks the markers itself
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height <= limits.max_pixels:
                check_decodable(image, limits, jpeg, data)
    except Image.DecompressionBombError:
        raise ImageTooManyPixelsError(f"the image has more pixels than the limit of {limits.max_pixels:,} (refused "
                                      "before decoding): downscale it", limit="max_pixels") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ImageError("the image cannot be read as a PNG, JPEG, WebP, GIF, BMP or TIFF image: the data is corrupt "
                         "or in another format") from None
    if width * height > limits.max_pixels:
        raise ImageTooManyPixelsError(f"the image is {width}×{height} = {width * height:,} pixels, over the limit of "
                                      f"{limits.max_pixels:,}: downscale it", limit="max_pixels")
    size = image_size(data)
    if size is None:  # the header does not tell: decode (load_image names the problem)
        size = load_image(data, limits=limits).size
    return {"width": int(size[0]), "height": int(size[1])}


def _image_tile(data: bytes, params: Mapping[str, Any]) -> tuple[dict, list[np.ndarray]]:
    from rksmolvlm.processing.image import ImageSettings, load_image, tile_image
    from rksmolvlm.processing.image_safety import DecodeLimits

    tiled = tile_image(load_image(data, limits=DecodeLimits(**params["limits"])),
                       ImageSettings.from_dict(params["settings"]))
    return {"rows": int(tiled.rows), "cols": int(tiled.cols)}, [tiled.tiles]


def _video_frames(data: bytes, params: Mapping[str, Any]) -> np.ndarray:
    from rksmolvlm.processing.video import VideoLimits
    from rksmolvlm.processing.video_frames import VideoSettings
    from rksmolvlm.runtime.decoding import decode_frames

    frames = decode_frames(data, params["indices"], VideoSettings.from_dict(params["settings"]),
                           VideoLimits(**params["limits"]))
    assert frames is not None  # nothing aborts inside the child: the parent kills it instead
    return frames


def _diagnose(context: Mapping[str, Any]) -> dict:
    import errno
    import os
    import resource

    from .sandbox import socket_errno

    code = socket_errno()
    return {"pid": os.getpid(), "as_limit": resource.getrlimit(resource.RLIMIT_AS)[0],
            "fsize_limit": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
            "cpu_soft": resource.getrlimit(resource.RLIMIT_CPU)[0], "no_network": code == errno.EPERM,
            "seccomp": str(context.get("seccomp", "unavailable: not applied")), "socket_errno": code}
