"""The server's configuration: ``/etc/rksmolvlm/config.toml`` validated against a schema, with
command-line flags layered on top.

The dataclasses below are the schema: each field's type, default, range and help text live in one
place, and validation, error messages and ``boards/config.example.toml`` all follow from them.
Every problem in a file is reported at once, each naming its key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rksmolvlm.errors import RkSmolVLMError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (Ubuntu 22.04 boards): tomllib's origin, the tomli package
    import tomli as tomllib

if TYPE_CHECKING:  # the config is read for `serve --help`: PyAV and numpy load on use
    from rksmolvlm.processing.video import VideoLimits

__all__ = [
    "ServerConfig", "ServerSection", "Limits", "ImageSources", "VideoSection", "DecodeSection", "ConfigError",
    "VIDEO_LIMIT_KEYS",
    "DEFAULT_CONFIG_PATH", "CONFIG_ENV", "load_config", "config_from_dict", "with_overrides", "schema_keys",
    "read_api_key",
]

DEFAULT_CONFIG_PATH = Path("/etc/rksmolvlm/config.toml")
CONFIG_ENV = "RKSMOLVLM_CONFIG"
MIB = 1024 * 1024
API_KEY_MAX_BYTES = 4096  # a key file is one line; anything bigger is the wrong file (or /dev/zero)

log = logging.getLogger(__name__)


class ConfigError(RkSmolVLMError):
    """A configuration file or flag that is missing, malformed or out of range."""

    exit_code = 78  # EX_CONFIG: the unit's RestartPreventExitStatus keeps systemd from retrying


def _key(default, help: str, *, min=None, max=None, choices=None, kind: str | None = None):
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices, "kind": kind})


@dataclass(frozen=True)
class ServerSection:
    host: str = _key("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to the network "
                     "(then set api_key_file)")
    port: int = _key(8080, "TCP port (0 picks a free one)", min=0, max=65535)
    api_key_file: str | None = _key(None, "file holding the API key clients send as 'Authorization: Bearer KEY' "
                                    "(unset: no key needed)", kind="path")
    queue_size: int = _key(4, "requests that may wait while one runs; more get 429 with Retry-After", min=0, max=1024)
    request_timeout_s: float = _key(300.0, "seconds a request may take, queue wait included; then it is aborted",
                                    min=0.1, max=86400)
    max_connections: int = _key(256, "open HTTP connections; a new one beyond this closes the oldest that has not "
                                "sent its request yet (idle, or slow), so idle sockets never lock clients out",
                                min=1, max=65536)
    header_timeout_s: float = _key(10.0, "seconds a client has to send a whole request head (from connecting, or "
                                   "from its first byte on a kept-alive connection); then 408 and closed",
                                   min=0.1, max=3600)
    body_timeout_s: float = _key(30.0, "seconds a request body may take, plus 1 s per body_min_rate bytes "
                                 "received (a fast upload earns time, a trickle does not); then 408 and closed",
                                 min=0.1, max=3600)
    body_min_rate: int = _key(16 * 1024, "bytes of request body per second that earn one more second "
                              "(see body_timeout_s)", min=1, max=1024 * MIB, kind="size")
    keepalive_timeout_s: float = _key(5.0, "seconds an idle kept-alive connection stays open between requests",
                                      min=0.1, max=3600)
    send_timeout_s: float = _key(30.0, "seconds a client may accept no byte of its answer before it is "
                                 "disconnected", min=0.1, max=3600)
    shutdown_grace_s: float = _key(10.0, "on SIGTERM, seconds the running request has to finish before it is "
                                   "aborted (its stream ends with an error event); waiting requests get 503 at once",
                                   min=0, max=3600)
    allowed_hosts: tuple[str, ...] = _key(("localhost", "127.0.0.1", "[::1]"), "Host header names (any port, or "
                                          "name:port) accepted while the server listens on loopback without an API "
                                          "key: the DNS-rebinding defence; [\"*\"]: any")
    model_name: str | None = _key(None, "model id in /v1/models and responses (default: the bundle's source model)")
    log_level: str = _key("info", "log verbosity", choices=("debug", "info", "warning", "error"))
    metrics_require_key: bool = _key(False, "ask for the API key on /metrics too")
    stall_timeout_s: float = _key(120.0, "a generation with no progress for this long counts as stuck: /health "
                                  "turns 503 and the systemd watchdog stops being fed", min=1, max=86400)
    strict_model_name: bool = _key(False, "answer 404 model_not_found to a model name other than the served id and "
                                   "its aliases (false: this one-model server answers any name)")
    cors_origins: tuple[str, ...] = _key((), "browser origins allowed to call the API (CORS), e.g. "
                                         "[\"http://192.168.1.20:3000\"]; [\"*\"]: any; empty: no CORS headers")
    web_ui: bool | str = _key("auto", "the web page at GET / for browsers (other clients still get the JSON index): "
                              "true, false, or \"auto\" = on when host is loopback or api_key_file is set",
                              kind="switch")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = _key(20 * MIB, "request body size (images travel base64-encoded: 4/3 of their size)",
                               min=1024, max=1024 * MIB, kind="size")
    max_image_bytes: int = _key(10 * MIB, "encoded size of one image", min=1, max=512 * MIB, kind="size")
    max_image_pixels: int = _key(50_000_000, "decoded pixels of one image (width × height), checked before decoding",
                                 min=1, max=100_000_000)
    max_images: int = _key(32, "images in one request (0: text only); those that do not fit the context split "
                           "are unsplit (images.default_detail) or refused", min=0, max=64)
    max_tokens: int = _key(16384, "the most tokens one answer may have: a larger max_tokens is capped to it (and "
                           "to the room the prompt leaves in the context), never refused; 16384 (the largest "
                           "context a bundle can have): only the context limits an answer", min=1, max=16384)
    default_max_tokens: int = _key(0, "max_tokens when a request does not say; 0: until the context ends (or "
                                   "limits.max_tokens)", min=0, max=16384)
    max_text_chars: int = _key(0, "characters of text in one request (all messages), refused before tokenizing; 0: "
                               "8 a token of the model's context (16,384 for a 2048-token context)", min=0,
                               max=1 << 30)
    max_messages: int = _key(1024, "messages in one request", min=1, max=1_000_000)
    max_parts: int = _key(256, "content parts (text and images) in one message", min=1, max=1_000_000)
    max_json_values: int = _key(100_000, "JSON values (strings, keys, numbers, arrays and objects) in one request "
                                "body, counted on its raw bytes before it is parsed: 4 million two-letter images "
                                "fit in 21 MB and would take gigabytes as Python objects", min=1000,
                                max=100_000_000)
    max_decode_bytes: int = _key(512 * MIB, "memory one image may take to decode, computed from its mode and size "
                                 "before decoding (1 byte a pixel for gray, 2 for 16-bit, 4 for RGB, RGBA and float, "
                                 "plus the RGB copy)", min=MIB, max=64 * 1024 * MIB, kind="size")
    max_jpeg_scans: int = _key(100, "scans in one progressive JPEG, counted before decoding (encoders write about 10; "
                               "each is a pass over the whole image); above 10 megapixels proportionally fewer",
                               min=1, max=1_000_000)


@dataclass(frozen=True)
class ImageSources:
    local_dir: str | None = _key(None, "directory that image_url may point into (file:///… or an absolute path); "
                                 "unset: local paths are refused", kind="path")
    allow_remote: bool = _key(False, "fetch http(s):// image URLs (the server makes outgoing requests)")
    remote_timeout_s: float = _key(10.0, "seconds for the whole fetch of one remote image: connecting, redirects and "
                                   "every read (a slow sender is cut off)", min=0.1, max=300)
    allow_private_networks: bool = _key(False, "let remote image URLs reach loopback, private, link-local and other "
                                        "non-public addresses (off: such URLs are refused)")
    default_detail: str = _key("auto-fit", "what an image with detail \"auto\" (or none) gets: \"high\" = split into "
                               "tiles, \"low\" = one unsplit tile, \"auto-fit\" = split unless the request's images do "
                               "not fit the context, then unsplit, largest first", choices=("auto-fit", "high", "low"))
    fit_answer_tokens: int = _key(256, "auto-fit unsplits images until the prompt leaves this many tokens for the "
                                  "answer (max_tokens if smaller; a longer answer is capped to the room left)",
                                  min=1, max=16384)
    longest_edge: int | None = _key(None, "the image processor's size longest_edge every image is resized to before "
                                    "it is split (transformers' size={\"longest_edge\": N}): a multiple of the "
                                    "bundle's tile size (512 on 256M/500M, 384 on 2.2B); smaller = fewer tiles and "
                                    "prompt tokens (unset: the model's own, 4 tiles' worth)", min=1, max=4096)
    max_tiles: int | None = _key(None, "the most split tiles per image (the global image not counted): each image is "
                                 "resized to the largest multiple of the tile size, at most longest_edge, whose "
                                 "split gives at most this many (unset: no limit)", min=1, max=4096)

    def resolution(self, tile_size: int):
        """The runner's Resolution of longest_edge/max_tiles for a bundle of ``tile_size`` (ConfigError
        naming the valid values when longest_edge is not a multiple of it)."""
        from rksmolvlm.processing.image import Resolution

        resolution = Resolution(longest_edge=self.longest_edge, max_tiles=self.max_tiles)
        try:
            resolution.check(tile_size)
        except ValueError as exc:
            raise ConfigError(f"images.longest_edge = {self.longest_edge}: {exc}") from None
        return resolution


@dataclass(frozen=True)
class VideoSection:
    """Video input (SmolVLM2 bundles): the defaults a request's sampling gets and the limits every
    video is held to (``VIDEO_LIMIT_KEYS``: rksmolvlm.processing.video.VideoLimits' fields)."""

    enabled: bool = _key(True, "accept video_url parts (SmolVLM2 bundles only; other models answer them with 400 "
                         "video_not_supported)")
    fps: float | None = _key(None, "frames sampled per second of video when a request does not say (unset: the "
                             "checkpoint's, 1 on the SmolVLM2 checkpoints)", min=0.001, max=1000)
    max_frames: int = _key(16, "the most frames sampled from one video when a request does not say (16 unsplit "
                           "frames ≈ 1,100 prompt tokens on 256M/500M and 16 tower passes); a request may ask for "
                           "more, capped to the checkpoint's own limit (64)", min=1, max=4096)
    max_videos: int = _key(1, "videos in one request", min=1, max=64)
    max_bytes: int = _key(14 * MIB, "encoded size of one video; for a model that takes video, the request body "
                          "limit is raised above limits.max_body_bytes when needed to carry one as a data: URI (4/3 "
                          "of it)", min=1, max=4096 * MIB, kind="size")
    max_duration_seconds: float = _key(600.0, "length of one video, read from the container before any frame is "
                                       "decoded", min=0.1, max=86400)
    max_stream_frames: int = _key(36_000, "frames in one video's stream (10 minutes at 60 fps), from the header, "
                                  "then counted in the packet scan before any frame is decoded", min=1,
                                  max=100_000_000)
    max_frame_pixels: int = _key(8_294_400, "pixels of one frame (width × height; 3840×2160 = 8,294,400), read from "
                                 "the stream header before decoding", min=1, max=100_000_000)
    max_side: int = _key(4096, "longest side of a frame in pixels, read from the stream header", min=1, max=65535)
    max_decode_seconds: float = _key(60.0, "seconds one reading of a video may take (opening, the packet scan, "
                                     "decoding the sampled frames); then it stops with 400 video_too_complex",
                                     min=0.1, max=3600)
    max_output_bytes: int = _key(512 * MIB, "memory the decoded frames of one video take (RGB: frames × width × "
                                 "height × 3); 16 frames of 3840×2160 take 380 MiB", min=MIB, max=64 * 1024 * MIB,
                                 kind="size")
    cache_frames: int = _key(256, "video frames whose vision features are kept, so a second question about a clip "
                             "decodes and encodes nothing", min=0, max=65536)

    def limits(self) -> "VideoLimits":
        """The limits as rksmolvlm.processing.video takes them."""
        from rksmolvlm.processing.video import VideoLimits

        return VideoLimits(**{name: getattr(self, name) for name in VIDEO_LIMIT_KEYS})


@dataclass(frozen=True)
class DecodeSection:
    """Untrusted images and videos are decoded in child processes with hard limits (runtime/jail/): a
    file that overruns them costs its child, which is killed and replaced, and gets a 400 naming the
    limit; the server, the model and /health are untouched."""

    workers: int = _key(3, "child processes that decode images and videos: one is kept for the request the model "
                        "is on, the others check new requests' media before they are queued (the RK3588 has 8 "
                        "cores; each idle child holds about 60 MB)", min=2, max=64)
    max_memory: int = _key(768 * MIB, "address space one decoding child may take beyond its idle size; a decode "
                           "past it is stopped with 400 image_too_complex / video_too_complex. The pool's worst case "
                           "is workers × (this + its idle size): keep it, the model and the server under the unit's "
                           "MemoryMax (6 GB)", min=64 * MIB, max=64 * 1024 * MIB, kind="size")
    probe_timeout_s: float = _key(10.0, "seconds the check of one image or video before its request is queued may "
                                  "take (a child opens it and reads its header or container); then 400 "
                                  "image_too_complex / video_too_complex", min=0.1, max=600)
    image_timeout_s: float = _key(30.0, "seconds decoding and tiling one image for the model may take (a video's "
                                  "frames have video.max_decode_seconds); then 400 image_too_complex", min=0.1,
                                  max=3600)


# The [video] keys that are VideoLimits fields (the same names: a VideoError's ``limit`` is video.<name>).
VIDEO_LIMIT_KEYS = ("max_bytes", "max_duration_seconds", "max_stream_frames", "max_frame_pixels", "max_side",
                    "max_decode_seconds", "max_output_bytes")


@dataclass(frozen=True)
class ServerConfig:
    bundle: str | None = _key(None, "bundle directory (BUNDLE on the command line overrides it)", kind="path")
    engine: str = _key("auto", "npu on the board, host = x86 preview; auto picks", choices=("auto", "host", "npu"))
    npu_cores: tuple[int, ...] | None = _key(None, "NPU core indices the vision tower uses, e.g. [0, 1, 2] "
                                             "(default: all of the SoC's)", min=0, max=7)
    rkllm_library: str | None = _key(None, "path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, "
                                     "/usr/local/lib)", kind="path")
    threads: int | None = _key(None, "CPU threads of the host engines (onnxruntime intra-op threads of the tower, "
                               "torch threads of the decoder); unset: the libraries' default (every core)",
                               min=1, max=1024)
    verify_bundle: bool = _key(True, "check the sha256 of every bundle file at start-up")
    image_cache_size: int = _key(32, "images whose vision features are kept for reuse", min=0, max=4096)
    server: ServerSection = field(default_factory=ServerSection)
    limits: Limits = field(default_factory=Limits)
    images: ImageSources = field(default_factory=ImageSources)
    video: VideoSection = field(default_factory=VideoSection)
    decode: DecodeSection = field(default_factory=DecodeSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def body_limit(self, takes_video: bool) -> int:
        """The request body limit: limits.max_body_bytes, raised for a model that takes video (with
        video.enabled) to what one video of video.max_bytes needs as a data: URI."""
        if not (takes_video and self.video.enabled):
            return self.limits.max_body_bytes
        return max(self.limits.max_body_bytes, (self.video.max_bytes + 2) // 3 * 4 + 64 * 1024)


_SECTIONS: dict[str, type] = {"server": ServerSection, "limits": Limits, "images": ImageSources,
                              "video": VideoSection, "decode": DecodeSection}


def schema_keys() -> dict[str, dataclasses.Field]:
    """Every configurable key, dotted (``server.port``), with its dataclass field."""
    out = {}
    for f in dataclasses.fields(ServerConfig):
        if f.name in _SECTIONS:
            out.update({f"{f.name}.{g.name}": g for g in dataclasses.fields(_SECTIONS[f.name])})
        else:
            out[f.name] = f
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# -- values ------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": MIB, "gb": 1000**3, "gib": 1024 * MIB}


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__)


def _convert(key: str, value, hint, meta: Mapping[str, Any]):
    """``value`` as the field's type, or raise ValueError with the message's tail (what to write)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    name = key.rsplit(".", 1)[-1]
    if meta.get("kind") == "switch":  # true, false or "auto"
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f"must be true, false or \"auto\", not {value!r}: write {name} = true (or false, or "
                         "\"auto\")")
    if meta.get("kind") == "path" and isinstance(value, str):
        # An empty path is a mistake (often an unset shell variable), never "unset": for api_key_file it
        # would silently switch the key check off. Unset means the key is absent or commented out.
        if not value.strip():
            raise ValueError(f"is an empty path: write the path, or remove the line (or comment it out) to leave "
                             f"{name} unset")
        if "\0" in value or any(c in value for c in "\r\n"):
            raise ValueError(f"= {value!r} holds a NUL or line break: write a plain path")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, not {_type_name(value)} ({value!r}): write {name} = true")
    if hint is int:
        if meta.get("kind") == "size" and isinstance(value, str):
            match = _SIZE.match(value)
            if not match:
                raise ValueError(f"{value!r} is not a size: write a number of bytes or e.g. \"20 MiB\"")
            return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            raise ValueError(f"must be an integer, not the string {value!r}: write {name} = {value.strip()} "
                             "without quotes")
        raise ValueError(f"must be an integer, not {_type_name(value)} ({value!r})")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer of hundreds of digits
                number = math.inf
            if not math.isfinite(number):  # nan passes every range check (all comparisons are false)
                span = f" from {meta['min']:,} to {meta['max']:,}" if meta.get("max") is not None else ""
                raise ValueError(f"must be a finite number{span}, not {str(value)[:20]}")
            return number
        raise ValueError(f"must be a number, not {_type_name(value)} ({value!r})")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, not {_type_name(value)} ({value!r}): write {name} = \"…\" in quotes")
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:  # tuple[str, ...]: an array of strings
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"must be an array of strings, e.g. {name} = [\"http://192.168.1.20:3000\"], not "
                             f"{value!r}")
        return tuple(value)
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: a TOML array of integers
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"must be an array of integers, e.g. {name} = [0, 1, 2], not {value!r}")
        if len(set(value)) != len(value) or not value:
            raise ValueError(f"must list distinct indices, at least one: e.g. {name} = [0, 1, 2]")
        return tuple(value)
    raise TypeError(f"schema type {hint!r} is not handled")  # pragma: no cover


def _check(key: str, value, meta: Mapping[str, Any]) -> str | None:
    """The problem with an in-type ``value`` (range, choices), or None."""
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if value is None:
        return None
    if choices and value not in choices:
        return f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}"
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if (lo is not None and item < lo) or (hi is not None and item > hi):
                return f"{key} = {_shown(value)} is out of range: use a value from {lo:,} to {hi:,}"
    return None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


# -- loading -----------------------------------------------------------------------------------
def _suggest(key: str) -> str:
    keys = list(schema_keys())
    bare = key.rsplit(".", 1)[-1]
    homes = [k for k in keys if k.rsplit(".", 1)[-1] == bare and k != key]
    if homes:
        section = homes[0].split(".")[0] if "." in homes[0] else None
        where = f"under [{section}]" if section else "at the top of the file, before any [section]"
        return f": did you mean {homes[0]!r}? put {bare} {where}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return f": did you mean {close[0]!r}?"
    return f": remove it (known keys: {', '.join(keys)})"


def _build(cls, values: dict, prefix: str, problems: list[str]):
    hints, kwargs = _hints(cls), {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        f = names.get(name)
        if f is None or name in _SECTIONS:
            if name in _SECTIONS and not prefix:
                continue  # handled by the caller
            problems.append(f"unknown key {key!r}{_suggest(key)}")
            continue
        try:
            converted = _convert(key, value, hints[name], f.metadata)
        except ValueError as exc:
            problems.append(f"{key} {exc}")
            continue
        problem = _check(key, converted, f.metadata)
        if problem:
            problems.append(problem)
            continue
        kwargs[name] = converted
    return kwargs


def config_from_dict(data: dict, source: str = "the configuration") -> ServerConfig:
    """A validated ``ServerConfig`` from parsed TOML; every problem is reported in one ConfigError."""
    problems: list[str] = []
    top = _build(ServerConfig, data, "", problems)
    for name, cls in _SECTIONS.items():
        if name not in data:
            continue
        table = data[name]
        if not isinstance(table, dict):
            problems.append(f"{name} must be a table: write [{name}] on its own line, then its keys")
            continue
        top[name] = cls(**_build(cls, table, f"{name}.", problems))
    if problems:
        raise ConfigError(_report(source, problems))
    config = ServerConfig(**top)
    problems.extend(_cross_checks(config))
    if problems:
        raise ConfigError(_report(source, problems))
    return config


_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$", re.IGNORECASE)
_HOST = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?)(:\d{1,5})?$", re.IGNORECASE)


def _cross_checks(config: ServerConfig) -> list[str]:
    problems = []
    limits = config.limits
    if limits.default_max_tokens > limits.max_tokens:
        problems.append(f"limits.default_max_tokens = {limits.default_max_tokens} is above limits.max_tokens = "
                        f"{limits.max_tokens}: lower it or raise max_tokens")
    one_image = (limits.max_image_bytes + 2) // 3 * 4 + 4096  # base64 of one image plus the JSON around it
    if limits.max_images and limits.max_body_bytes < one_image:
        problems.append(f"limits.max_body_bytes = {limits.max_body_bytes:,} cannot carry one image of "
                        f"limits.max_image_bytes = {limits.max_image_bytes:,} (base64 needs {one_image:,}): raise "
                        "max_body_bytes or lower max_image_bytes")
    if limits.max_decode_bytes > config.decode.max_memory:
        problems.append(f"limits.max_decode_bytes = {limits.max_decode_bytes:,} is above decode.max_memory = "
                        f"{config.decode.max_memory:,}: an image within the decode budget could not be decoded in "
                        "its child; lower max_decode_bytes or raise max_memory")
    for origin in config.server.cors_origins:
        if origin != "*" and not _ORIGIN.match(origin):
            problems.append(f"server.cors_origins holds {origin!r}: write an origin as the browser sends it, "
                            "scheme://host[:port] without a path or trailing slash (e.g. "
                            "\"http://192.168.1.20:3000\"), or \"*\" for any")
    for host in config.server.allowed_hosts:
        if host != "*" and not _HOST.match(host):
            problems.append(f"server.allowed_hosts holds {host!r}: write a host name as clients type it, without "
                            "scheme or path (e.g. \"myboard.local\" or \"myboard.local:8080\"), or \"*\" for any")
    local = config.images.local_dir
    if local and not Path(local).is_absolute():
        problems.append(f"images.local_dir = {local!r} must be an absolute path, e.g. \"/srv/images\"")
    elif local and not Path(local).is_dir():
        problems.append(f"images.local_dir = {config.images.local_dir!r} is not a directory: create it or remove "
                        "the key")
    return problems


def _report(source: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def load_config(path: str | os.PathLike | None) -> ServerConfig:
    """Read and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return ServerConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: create it from boards/config.example.toml, or "
                          "pass another with --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror}): check its permissions (the service "
                          "user must be able to read it)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}): fix the line it names") from None
    except ValueError as exc:  # tomllib's int() of a number over 4,300 digits
        raise ConfigError(f"config file {path} holds a number TOML cannot read ({str(exc)[:80]}): write a "
                          "smaller one") from None
    return config_from_dict(data, str(path))


def with_overrides(config: ServerConfig, overrides: dict[str, object], source: str = "command line") -> ServerConfig:
    """``config`` with dotted keys replaced (command-line flags), validated like the file."""
    data = config.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if isinstance(value, tuple):
            value = list(value)
        (data[section] if section else data)[name] = value
    if isinstance(data.get("npu_cores"), tuple):
        data["npu_cores"] = list(data["npu_cores"])
    if isinstance(data["server"].get("cors_origins"), tuple):
        data["server"]["cors_origins"] = list(data["server"]["cors_origins"])
    if isinstance(data["server"].get("allowed_hosts"), tuple):
        data["server"]["allowed_hosts"] = list(data["server"]["allowed_hosts"])
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    for section in _SECTIONS:
        data[section] = {k: v for k, v in data[section].items() if v is not None}
    return config_from_dict(data, source)


def read_api_key(path: str | os.PathLike) -> str:
    """The API key in ``path``: a regular file of at most ``API_KEY_MAX_BYTES`` holding one word of printable
    ASCII (surrounding whitespace dropped). A file that others may read is accepted with a logged warning."""
    path = Path(path)
    where = f"server.api_key_file {path}"
    try:
        kind = _file_kind(os.stat(path).st_mode)  # before opening: opening a FIFO blocks, a device may not end
        if kind:
            raise ConfigError(f"{where} is {kind}, not a regular file: write the key into a file, e.g. "
                              f"'openssl rand -hex 32 > /etc/rksmolvlm/api_key'")
        # O_NONBLOCK: if the path became a FIFO since the stat, the open still returns and fstat refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist: create it (e.g. 'openssl rand -hex 32 > {path}') or remove "
                          "the key") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {where} ({exc.strerror}): make it readable by the service user (e.g. "
                          "chown root:rksmolvlm, chmod 640)") from None
    try:
        info = os.fstat(fd)
        if _file_kind(info.st_mode):
            raise ConfigError(f"{where} is {_file_kind(info.st_mode)}, not a regular file: write the key into a file")
        data = b""
        if info.st_size <= API_KEY_MAX_BYTES:  # the size can lie (/proc) or grow: the read is bounded as well
            while chunk := os.read(fd, API_KEY_MAX_BYTES + 1 - len(data)):
                data += chunk
                if len(data) > API_KEY_MAX_BYTES:
                    break
    except OSError as exc:
        raise ConfigError(f"cannot read {where} ({exc.strerror}): check the file") from None
    finally:
        os.close(fd)
    if info.st_size > API_KEY_MAX_BYTES or len(data) > API_KEY_MAX_BYTES:
        raise ConfigError(f"{where} is larger than {API_KEY_MAX_BYTES:,} bytes: it should hold one key, e.g. "
                          f"'openssl rand -hex 32 > {path}' (is it the right file?)")
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not text: write the key as one line") from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"{where} must hold one key without spaces (it is "
                          f"{'empty' if not key else 'several words'}): e.g. 'openssl rand -hex 32 > {path}'")
    if not all("!" <= c <= "~" for c in key):
        raise ConfigError(f"{where} holds characters other than printable ASCII, which clients cannot send in an "
                          f"Authorization header: e.g. 'openssl rand -hex 32 > {path}'")
    if len(key) < 16:
        raise ConfigError(f"the API key in {path} is {len(key)} characters: use at least 16 "
                          "(e.g. 'openssl rand -hex 32')")
    exposure = _key_file_exposure(info)
    if exposure:
        log.warning("%s is %s (mode %04o): anyone who can read it can use the model; chmod 600 it, or give it "
                    "the layout install.sh makes (owner root, group of the service, chmod 640)", where, exposure,
                    stat.S_IMODE(info.st_mode))
    return key


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is ("a directory", "a FIFO", …), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"  # pragma: no cover


def _key_file_exposure(info: os.stat_result) -> str | None:
    """Who besides the service may read or change a key file, or None. Group read is expected in one layout:
    owned by root, group = the server's own group (install.sh: root:rksmolvlm, mode 640)."""
    mode = info.st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return "readable by every user" if mode & stat.S_IROTH else "writable by every user"
    if mode & stat.S_IWGRP:
        return "writable by its group"
    if mode & stat.S_IRGRP and not (info.st_uid == 0 and info.st_gid == os.getegid()):
        return "readable by its group"
    return None
