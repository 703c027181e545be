"""``rksmolvlm serve``: an OpenAI-compatible HTTP server over the pipeline, run by systemd on the board.

One worker thread owns the pipeline (and so the NPU) and runs one request at a time; requests wait
in a bounded queue (full: 429 with Retry-After). Every request is checked before it may queue —
body size, JSON, parameters, image type, bytes and pixel count (read from the header, never
decoded) — and refused with an OpenAI-style error body naming the limit. A client that goes away,
or a request over its time limit, aborts its generation. The systemd side (sd_notify READY /
WATCHDOG / STOPPING over ``$NOTIFY_SOCKET``) is implemented here with a plain datagram socket.

Endpoints: ``POST /v1/chat/completions`` (``stream: true`` → server-sent events), ``GET /v1/models``,
``GET /health`` (200 once the bundle is loaded, 503 while loading, failed or stuck),
``GET /health/live``, ``GET /metrics`` (Prometheus text).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .. import __version__
from ..errors import ImageError, RkSmolVLMError
from .server_config import (CONFIG_ENV, DEFAULT_CONFIG_PATH, ConfigError, ServerConfig, load_config, read_api_key,
                            with_overrides)

if TYPE_CHECKING:  # the module is imported for `rksmolvlm --help`: numpy and friends load on use
    from .engines import GenerationConfig, PerfStats

__all__ = [
    "add_serve_arguments", "serve_command", "build_app", "create_app", "open_pipeline", "ModelService", "ServedModel",
    "ChatRequest", "RequestReader", "ApiError", "Metrics", "SystemdNotifier", "BackgroundServer",
]

log = logging.getLogger("rksmolvlm.server")

# MIME type → Pillow format; nothing else is ever handed to the decoder.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP", "image/tiff": "TIFF"}
_PIL_FORMATS = tuple(sorted(set(IMAGE_TYPES.values())))
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MAX_STOPS = 4


# ==============================================================================================
# Errors
# ==============================================================================================
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                   429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class ApiError(RkSmolVLMError):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _ClientGone(Exception):
    """The client closed the connection."""


# ==============================================================================================
# Requests: JSON body → ChatRequest, every limit checked before the request may queue
# ==============================================================================================
@dataclass
class ChatRequest:
    """A checked chat completion request; image parts carry the image bytes (``{"type": "image"}``)."""

    messages: list[dict]
    config: GenerationConfig
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    images: int = 0
    image_bytes: int = 0


@dataclass(frozen=True)
class ServedModel:
    """What the server says about its model: the id clients name, and the bundle's facts."""

    id: str
    aliases: tuple[str, ...]
    max_context: int
    created: int
    engine: str
    details: dict = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle, name: str | None, engine: str) -> "ServedModel":
        manifest = bundle.manifest
        source = str(manifest.get("source", {}).get("model_id") or bundle.path.name)
        created = int(bundle.path.joinpath("manifest.json").stat().st_mtime)
        model = manifest.get("model", {})
        details = {"family": model.get("family"), "size": model.get("size"),
                   "target": manifest.get("target", {}).get("platform"),
                   "vision_dtype": manifest.get("vision", {}).get("dtype"),
                   "llm_dtype": (manifest.get("llm", {}).get("recipe") or {}).get("dtype"),
                   "max_context": bundle.max_context, "engine": engine}
        ident = name or source
        aliases = tuple(dict.fromkeys(a for a in (source, bundle.path.name) if a != ident))
        return cls(ident, aliases, bundle.max_context, created, engine, details)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


class RequestReader:
    """Reads a chat completion body: every field checked, every image fetched and its header checked
    against the limits (type, bytes, pixels) — all before the request may take a queue slot."""

    def __init__(self, config: ServerConfig, model: ServedModel):
        self.config = config
        self.limits = config.limits
        self.model = model

    def read(self, body: bytes) -> ChatRequest:
        payload = _parse_json(body)
        self._check_model(payload.get("model"))
        self._refuse_unsupported(payload)
        stream = _bool(payload, "stream", False)
        options = payload.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise ApiError(400, "stream_options is only allowed with stream: true", "invalid_value",
                               "stream_options")
            if not isinstance(options, dict):
                raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}",
                               "invalid_type", "stream_options")
            include_usage = _bool(options, "include_usage", False, "stream_options.include_usage")
        config = self._generation(payload)
        stops = self._stops(payload.get("stop"))
        messages, sources = self._messages(payload.get("messages"))
        if len(sources) > self.limits.max_images:
            raise ApiError(400, f"the request has {len(sources)} images, over limits.max_images = "
                           f"{self.limits.max_images}: send at most {self.limits.max_images} per request",
                           "too_many_images", "messages")
        total = 0
        for part, (url, param) in sources:
            part["image"] = self._image(url, param)
            total += len(part["image"])
        return ChatRequest(messages, config, stops, stream, include_usage, len(sources), total)

    # -- fields ----------------------------------------------------------------------------------
    def _check_model(self, model) -> None:
        if model is None:
            return  # the server has one model; curl users may leave it out
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string", "invalid_type", "model")
        if model not in self.model.names:
            raise ApiError(404, f"the model {model!r} is not served here: use {self.model.id!r} "
                           "(GET /v1/models lists it)", "model_not_found", "model")

    @staticmethod
    def _refuse_unsupported(payload: dict) -> None:
        n = payload.get("n", 1)
        if n not in (1, None):
            raise ApiError(400, "n must be 1: this server makes one answer per request (send several requests)",
                           "unsupported_value", "n")
        for name in ("tools", "functions"):
            if payload.get(name):
                raise ApiError(400, f"{name} are not supported by SmolVLM: leave {name} out", "unsupported_parameter",
                               name)
        if payload.get("tool_choice") not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice is not supported: leave it out", "unsupported_parameter", "tool_choice")
        if payload.get("logprobs"):
            raise ApiError(400, "logprobs are not supported: leave logprobs out (token ids are in the response's "
                           "'rksmolvlm' field)", "unsupported_parameter", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            value = payload.get(name)
            if value not in (None, 0, 0.0):
                raise ApiError(400, f"{name} is not supported: leave it out or at 0", "unsupported_parameter", name)
        if payload.get("logit_bias"):
            raise ApiError(400, "logit_bias is not supported: leave it out", "unsupported_parameter", "logit_bias")
        fmt = payload.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "unsupported_value",
                           "response_format")

    def _generation(self, payload: dict) -> GenerationConfig:
        from .engines import GenerationConfig

        limits = self.limits
        name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(payload, name, limits.default_max_tokens, 1, None)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"{name} = {max_tokens} is over limits.max_tokens = {limits.max_tokens}: ask for at "
                           "most that many", "invalid_value", name)
        if max_tokens >= self.model.max_context:
            raise ApiError(400, f"{name} = {max_tokens} leaves no room for the prompt in the model's context of "
                           f"{self.model.max_context} tokens: ask for fewer", "context_length_exceeded", name)
        temperature = _number(payload, "temperature", 0.0, 0.0, 2.0)
        top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise ApiError(400, "top_p must be above 0 (use temperature 0 for greedy decoding)", "invalid_value",
                           "top_p")
        top_k = _int(payload, "top_k", 0, 0, None)
        seed = _int(payload, "seed", None, None, None)
        return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed)

    @staticmethod
    def _stops(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "stop must be a string or an array of strings", "invalid_type", "stop")
        if len(stops) > _MAX_STOPS:
            raise ApiError(400, f"stop has {len(stops)} strings: send at most {_MAX_STOPS}", "invalid_value", "stop")
        return tuple(s for s in stops if s)

    def _messages(self, messages) -> tuple[list[dict], list]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array of {\"role\", \"content\"} objects",
                           "invalid_value" if isinstance(messages, list) else "missing_required_parameter",
                           "messages")
        out, sources = [], []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise ApiError(400, f"{where} must be an object with role and content", "invalid_type", where)
            role = message.get("role")
            if role not in _ROLES:
                raise ApiError(400, f"{where}.role is {role!r}: use system, user or assistant (tools are not "
                               "supported)", "invalid_value", f"{where}.role")
            if message.get("tool_calls"):
                raise ApiError(400, f"{where}.tool_calls: tools are not supported", "unsupported_parameter",
                               f"{where}.tool_calls")
            content = message.get("content")
            if content is None or isinstance(content, str):
                out.append({"role": _ROLES[role], "content": content or ""})
                continue
            if not isinstance(content, list):
                raise ApiError(400, f"{where}.content must be a string or an array of parts", "invalid_type",
                               f"{where}.content")
            parts = []
            for j, part in enumerate(content):
                param = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ApiError(400, f"{param}.text must be a string", "invalid_type", f"{param}.text")
                    parts.append({"type": "text", "text": text})
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise ApiError(400, f"{param}.image_url must be {{\"url\": \"data:image/png;base64,…\"}}",
                                       "invalid_type", f"{param}.image_url")
                    image = {"type": "image"}
                    parts.append(image)
                    sources.append((image, (url, f"{param}.image_url")))
                else:
                    raise ApiError(400, f"{param} has type {kind!r}: use 'text' or 'image_url'", "invalid_value",
                                   f"{param}.type")
            out.append({"role": _ROLES[role], "content": parts})
        return out, sources

    # -- images ----------------------------------------------------------------------------------
    def _image(self, url: str, param: str) -> bytes:
        if url.startswith("data:"):
            data = self._from_data_uri(url, param)
        elif url.startswith(("http://", "https://")):
            data = self._from_remote(url, param)
        elif url.startswith("file://") or url.startswith("/"):
            data = self._from_local(url, param)
        else:
            scheme = url.split(":", 1)[0][:16] if ":" in url else "a relative path"
            raise ApiError(400, f"{param}: {scheme!r} images are not supported: send a data: URI "
                           "(data:image/png;base64,…)", "invalid_image_url", param)
        self._check_image(data, param)
        return data

    def _too_big(self, size: int | str, param: str) -> ApiError:
        return ApiError(413, f"{param} is {size if isinstance(size, str) else f'{size:,}'} bytes, over "
                        f"limits.max_image_bytes = {self.limits.max_image_bytes:,}: send a smaller image "
                        "(downscale or compress it)", "image_too_large", param)

    def _from_data_uri(self, url: str, param: str) -> bytes:
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise ApiError(400, f"{param} is not a valid data: URI: write data:image/png;base64,<base64 bytes>",
                           "invalid_image_url", param)
        fields = [f.strip().lower() for f in header.split(";")]
        mime = fields[0] or "text/plain"
        if mime not in IMAGE_TYPES:
            raise ApiError(400, f"{param} has the type {mime[:64]!r}: send image/png, image/jpeg, image/webp, "
                           "image/gif, image/bmp or image/tiff", "unsupported_image_type", param)
        if "base64" not in fields[1:]:
            raise ApiError(400, f"{param} must be base64-encoded: write data:{mime};base64,<base64 bytes>",
                           "invalid_image_url", param)
        if len(payload) // 4 * 3 > self.limits.max_image_bytes + 3:
            raise self._too_big(f"about {len(payload) // 4 * 3:,}", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            try:  # some clients wrap base64 in lines
                return base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{param} is not valid base64: encode the image file's bytes with standard "
                               "base64", "invalid_image", param) from None

    def _from_local(self, url: str, param: str) -> bytes:
        root = self.config.images.local_dir
        if not root:
            raise ApiError(400, f"{param}: local image paths are off: send the image as a data: URI, or set "
                           "images.local_dir in the server config to the directory they may come from",
                           "local_images_disabled", param)
        if url.startswith("file://"):
            parsed = urllib.parse.urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise ApiError(400, f"{param}: file URLs must name this machine (file:///path)", "invalid_image_url",
                               param)
            text = urllib.parse.unquote(parsed.path)
        else:
            text = url
        path = Path(text).resolve()
        base = Path(root).resolve()
        if not path.is_relative_to(base):
            raise ApiError(400, f"{param} is outside images.local_dir ({root}): only images under it may be read",
                           "image_path_not_allowed", param)
        try:
            with path.open("rb") as f:
                data = f.read(self.limits.max_image_bytes + 1)
        except FileNotFoundError:
            raise ApiError(400, f"{param}: no such file under images.local_dir", "invalid_image", param) from None
        except OSError as exc:
            raise ApiError(400, f"{param}: cannot read the file ({exc.strerror})", "invalid_image", param) from None
        if len(data) > self.limits.max_image_bytes:
            raise self._too_big(f"over {self.limits.max_image_bytes:,}", param)
        return data

    def _from_remote(self, url: str, param: str) -> bytes:
        images = self.config.images
        if not images.allow_remote:
            raise ApiError(400, f"{param}: remote image URLs are off (images.allow_remote = false): send the image "
                           "as a data: URI (data:image/png;base64,…)", "remote_images_disabled", param)
        request = urllib.request.Request(url, headers={"User-Agent": f"rksmolvlm/{__version__}"})
        limit = self.limits.max_image_bytes
        try:
            with urllib.request.urlopen(request, timeout=images.remote_timeout_s) as response:
                mime = response.headers.get_content_type()
                if mime not in IMAGE_TYPES:
                    raise ApiError(400, f"{param}: the server sent {mime!r}, not an image type this server takes",
                                   "unsupported_image_type", param)
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > limit:
                    raise self._too_big(int(declared), param)
                data = response.read(limit + 1)
        except urllib.error.HTTPError as exc:
            raise ApiError(400, f"{param}: fetching the image failed with HTTP {exc.code}", "image_fetch_failed",
                           param) from None
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(400, f"{param}: fetching the image failed ({reason}); the server waits "
                           f"images.remote_timeout_s = {images.remote_timeout_s} s", "image_fetch_failed",
                           param) from None
        if len(data) > limit:
            raise self._too_big(f"over {limit:,}", param)
        return data

    def _check_image(self, data: bytes, param: str) -> None:
        """Type, size and pixel count from the header only: nothing is decoded here."""
        from PIL import Image, UnidentifiedImageError

        limit = self.limits.max_image_pixels
        if not data:
            raise ApiError(400, f"{param}: the image is empty (0 bytes): send the image file's contents",
                           "invalid_image", param)
        if len(data) > self.limits.max_image_bytes:
            raise self._too_big(len(data), param)
        try:
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
                width, height = image.size
        except Image.DecompressionBombError:
            raise ApiError(400, f"{param} has more pixels than limits.max_image_pixels = {limit:,} (refused before "
                           "decoding): downscale it", "image_too_many_pixels", param) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise ApiError(400, f"{param} cannot be read as a PNG, JPEG, WebP, GIF, BMP or TIFF image: the data is "
                           "corrupt or in another format", "invalid_image", param) from None
        if width * height > limit:
            raise ApiError(400, f"{param} is {width}×{height} = {width * height:,} pixels, over "
                           f"limits.max_image_pixels = {limit:,}: downscale it", "image_too_many_pixels", param)


def _parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON: send a JSON object", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                       f"{exc.colno}): send a JSON object", "invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object with model and messages", "invalid_json")
    return payload


def _bool(payload: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{param or name} must be true or false", "invalid_type", param or name)
    return value


def _int(payload: dict, name: str, default, lo, hi):
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer", "invalid_type", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise ApiError(400, f"{name} = {value} is out of range: use {bounds}", "invalid_value", name)
    return value


def _number(payload: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number", "invalid_type", name)
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} = {value} is out of range: use {lo} to {hi}", "invalid_value", name)
    return float(value)


# ==============================================================================================
# The worker: one pipeline, one thread, a bounded queue
# ==============================================================================================
@dataclass
class Answer:
    """One finished generation, as the client will see it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: PerfStats
    queue_ms: float

    def extra(self) -> dict:
        """The ``rksmolvlm`` field of a response (ignored by OpenAI clients)."""
        timings = self.stats.to_dict()
        timings.pop("engine", None)
        return {"token_ids": list(self.token_ids), "timings": {"queue_ms": round(self.queue_ms, 3), **timings}}


class Job:
    """One accepted request on its way through the queue; the worker posts its events
    (``delta`` text, ``done`` Answer, ``error`` ApiError) to the request's event loop."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop, request_id: str):
        self.request = request
        self.id = request_id
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.received = time.monotonic()
        self.started: float | None = None
        self.cancel_reason: str | None = None
        self.finished = False

    def post(self, kind: str, value=None) -> None:
        """Queue an event for the request (callable from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class _AnswerText:
    """Raw text deltas → the message content: cut before the first stop string (text that may still
    become one is held back), without the one space the model writes after "Assistant:" (so the
    content renders back into the same prompt)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.raw = ""
        self.sent = 0
        self.stopped = False
        self._scanned = 0

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.raw += delta
        cut = self._stop_at()
        if cut is not None:
            self.stopped = True
            self.raw = self.raw[:cut]
            return self._emit(len(self.raw))
        return self._emit(len(self.raw) - self._held())

    def finish(self) -> str:
        return self._emit(len(self.raw))

    @property
    def text(self) -> str:
        return self._clean(self.raw)

    @staticmethod
    def _clean(text: str) -> str:
        return text[1:] if text.startswith(" ") else text

    def _emit(self, end: int) -> str:
        out = self._clean(self.raw[:end])
        delta, self.sent = out[self.sent:], max(self.sent, len(out))
        return delta

    def _stop_at(self) -> int | None:
        start = max(0, self._scanned - self.longest + 1)
        self._scanned = len(self.raw)
        found = [i for i in (self.raw.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        for n in range(min(self.longest - 1, len(self.raw)), 0, -1):
            tail = self.raw[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


class ModelService:
    """The one pipeline that owns the NPU. A worker thread loads it, then runs queued jobs one at a
    time; the HTTP side submits jobs, reads their events and cancels them."""

    def __init__(self, load: Callable[[], object], model: ServedModel, queue_size: int, metrics: "Metrics",
                 stall_timeout_s: float = 120.0):
        self._load = load
        self.model = model
        self.queue_size = queue_size
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self.state = "starting"  # → loading → ready | failed; → stopped
        self.error: str | None = None
        self.exit_code = 0
        self.pipeline = None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._current: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._progress = time.monotonic()
        self._job_seconds = 1.0  # moving average, for Retry-After
        self._on_state: Callable[[str], None] = lambda state: None

    # -- life ------------------------------------------------------------------------------------
    def start(self, on_state: Callable[[str], None] | None = None) -> None:
        self._on_state = on_state or self._on_state
        self.state = "loading"
        self._thread = threading.Thread(target=self._main, name="rksmolvlm-worker", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones, abort the running one, stop the worker, free the engines."""
        with self._cond:
            self._closing = True
            drained = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in drained:
            job.cancel_reason = job.cancel_reason or "shutdown"
            job.finished = True
            self.metrics.inc("rksmolvlm_dropped_queued_total", reason="shutdown")
            job.post("error", ApiError(503, "the server is shutting down: retry in a moment", "shutting_down",
                                       headers={"Retry-After": "5"}))
        current = self._current
        if current is not None:
            self.cancel(current, "shutdown")
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def _main(self) -> None:
        try:
            self.pipeline = self._load()
        except BaseException as exc:  # noqa: BLE001 - reported, then the server stops
            self.error = str(exc) if isinstance(exc, RkSmolVLMError) else f"{type(exc).__name__}: {exc}"
            self.exit_code = exc.exit_code if isinstance(exc, RkSmolVLMError) else 1
            if not isinstance(exc, RkSmolVLMError):
                log.exception("loading the model failed")
            self.state = "failed"
            self._on_state("failed")
            return
        self.state = "ready"
        self._on_state("ready")
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        break
                    job = self._current = self._waiting.popleft()
                try:
                    self._run(job)
                finally:
                    with self._cond:
                        self._current = None
                        job.finished = True
        finally:
            for part in (getattr(self.pipeline, "vision", None), getattr(self.pipeline, "llm", None)):
                with contextlib.suppress(Exception):
                    part.close()

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, request: ChatRequest, loop: asyncio.AbstractEventLoop, request_id: str) -> Job:
        with self._cond:
            if self.state != "ready" or self._closing:
                raise self.unavailable()
            held = len(self._waiting) + (self._current is not None)
            if held >= self.queue_size + 1:
                wait = self.retry_after()
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting for the model "
                               f"(server.queue_size = {self.queue_size}); retry after {wait} s", "queue_full",
                               headers={"Retry-After": str(wait)})
            job = Job(request, loop, request_id)
            self._waiting.append(job)
            self._cond.notify()
            return job

    def cancel(self, job: Job, reason: str) -> None:
        """Stop ``job``: drop it from the queue, or abort its generation (client gone, timeout, shutdown)."""
        with self._cond:
            if job.finished or job.cancel_reason:
                return
            job.cancel_reason = reason
            if job in self._waiting:
                self._waiting.remove(job)
                job.finished = True
                self.metrics.inc("rksmolvlm_dropped_queued_total", reason=reason)
            elif job is self._current and self.pipeline is not None:
                self.pipeline.abort()  # under the lock: the worker cannot have moved on to another job

    def retry_after(self) -> int:
        return max(1, min(300, math.ceil(self._job_seconds * (len(self._waiting) + 1))))

    def unavailable(self) -> ApiError:
        if self.state == "failed":
            return ApiError(503, f"the model failed to load: {self.error}", "model_failed")
        if self._closing or self.state == "stopped":
            return ApiError(503, "the server is shutting down: retry in a moment", "shutting_down",
                            headers={"Retry-After": "5"})
        return ApiError(503, "the model is still loading: retry in a few seconds (GET /health says when it is "
                        "ready)", "model_loading", headers={"Retry-After": "5"})

    def stalled(self) -> bool:
        """True when a generation has made no progress for stall_timeout_s (a stuck NPU)."""
        return self._current is not None and time.monotonic() - self._progress > self.stall_timeout_s

    def snapshot(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": int(self._current is not None),
                    "capacity": self.queue_size}

    def _run(self, job: Job) -> None:
        from .pipeline import ContextError

        request = job.request
        job.started = self._progress = time.monotonic()
        queue_ms = (job.started - job.received) * 1000
        self.metrics.observe("rksmolvlm_queue_wait_seconds", queue_ms / 1000)
        answer = _AnswerText(request.stop)
        aborting = False
        try:
            generation = self.pipeline.generate(request.messages, request.config, keep_history=False)
            for delta in generation:
                self._progress = time.monotonic()
                if aborting:
                    continue
                text = answer.push(delta)
                if text and request.stream:
                    job.post("delta", text)
                if answer.stopped or job.cancel_reason:
                    self.pipeline.abort()  # from this thread: the engine is running for sure
                    aborting = True
            if not aborting:
                tail = answer.finish()
                if tail and request.stream:
                    job.post("delta", tail)
        except ImageError as exc:
            return self._fail(job, ApiError(400, str(exc), "invalid_image", "messages"))
        except ContextError as exc:
            return self._fail(job, ApiError(400, str(exc), "context_length_exceeded", "messages"))
        except RkSmolVLMError as exc:
            log.error("request %s: the engine failed: %s", job.id, exc)
            return self._fail(job, ApiError(500, f"the engine failed: {exc}", "engine_error"))
        except Exception:
            log.exception("request %s failed", job.id)
            return self._fail(job, ApiError(500, f"internal error (request {job.id}): see the server log",
                                            "internal_error"))
        finish = "stop" if answer.stopped else (generation.finish_reason or "stop")
        if job.cancel_reason and not answer.stopped:
            finish = "abort"
            self.metrics.inc("rksmolvlm_aborted_generations_total", reason=job.cancel_reason)
        result = Answer(answer.text, list(generation.token_ids), finish, generation.prompt_tokens,
                        generation.stats, queue_ms)
        self._record(job, result)
        self._finish(job, "done", result)

    def _fail(self, job: Job, error: ApiError) -> None:
        self._finish(job, "error", error)

    def _finish(self, job: Job, kind: str, value) -> None:
        with self._cond:  # finished first: a late cancel() must not abort the engine for nothing
            job.finished = True
        job.post(kind, value)

    def _record(self, job: Job, result: Answer) -> None:
        s, m = result.stats, self.metrics
        seconds = time.monotonic() - job.started
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * seconds
        m.inc("rksmolvlm_prompt_tokens_total", result.prompt_tokens)
        m.inc("rksmolvlm_completion_tokens_total", len(result.token_ids))
        if result.token_ids:
            m.observe("rksmolvlm_time_to_first_token_seconds", result.queue_ms / 1000 + s.first_token_ms / 1000)
        if s.generate_tokens > 1 and s.generate_ms > 0:
            m.observe("rksmolvlm_decode_tokens_per_second", (s.generate_tokens - 1) / (s.generate_ms / 1000))
        if s.vision_tiles:
            m.inc("rksmolvlm_vision_tiles_total", s.vision_tiles)
            m.inc("rksmolvlm_vision_seconds_total", s.vision_ms / 1000)
            m.observe("rksmolvlm_vision_seconds_per_tile", s.vision_ms / 1000 / s.vision_tiles)
        m.observe("rksmolvlm_generation_seconds", seconds)


def open_pipeline(bundle, config: ServerConfig, engine: str):
    """The pipeline the server runs: the bundle's engines with the configured cores, library and limits."""
    from .pipeline import Pipeline

    cores = list(config.npu_cores) if config.npu_cores is not None else None
    from .engines import GenerationConfig

    # librkllmrt 1.2.x takes max_new_tokens at start-up only: make room for the largest request.
    startup = GenerationConfig(max_new_tokens=max(1, min(config.limits.max_tokens, bundle.max_context - 1)))
    vision, llm = bundle.make_engines(engine, library=config.rkllm_library, cores=cores, config=startup)
    return Pipeline(bundle, vision, llm, image_cache_size=config.image_cache_size,
                    max_pixels=config.limits.max_image_pixels)


# ==============================================================================================
# Metrics: Prometheus text format, no dependency
# ==============================================================================================
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TILE_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
_RATES = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 500, 1000)

# name → (type, help, histogram buckets)
_METRICS: dict[str, tuple[str, str, tuple | None]] = {
    "rksmolvlm_requests_total": ("counter", "HTTP requests answered, by path and status.", None),
    "rksmolvlm_errors_total": ("counter", "Error responses, by error code.", None),
    "rksmolvlm_aborted_generations_total": ("counter", "Generations stopped before their end, by reason "
                                            "(client_disconnect, timeout, shutdown).", None),
    "rksmolvlm_dropped_queued_total": ("counter", "Requests that left the queue before running, by reason.", None),
    "rksmolvlm_prompt_tokens_total": ("counter", "Prompt tokens processed.", None),
    "rksmolvlm_completion_tokens_total": ("counter", "Tokens generated.", None),
    "rksmolvlm_vision_tiles_total": ("counter", "Image tiles encoded by the vision tower.", None),
    "rksmolvlm_vision_seconds_total": ("counter", "Seconds spent in the vision tower.", None),
    "rksmolvlm_queue_wait_seconds": ("histogram", "Seconds a request waited in the queue.", _SECONDS),
    "rksmolvlm_time_to_first_token_seconds": ("histogram", "Seconds from arrival to the first token.", _SECONDS),
    "rksmolvlm_decode_tokens_per_second": ("histogram", "Decode speed of each request (tokens/s).", _RATES),
    "rksmolvlm_vision_seconds_per_tile": ("histogram", "Vision tower seconds per tile, per request.", _TILE_SECONDS),
    "rksmolvlm_generation_seconds": ("histogram", "Seconds a request held the model.", _SECONDS),
}


_UNLABELED = ("rksmolvlm_prompt_tokens_total", "rksmolvlm_completion_tokens_total", "rksmolvlm_vision_tiles_total",
              "rksmolvlm_vision_seconds_total")


class Metrics:
    """Counters and histograms (thread-safe), rendered with the live gauges as Prometheus text."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = {name: {} for name, (kind, _, _) in _METRICS.items()
                                                         if kind == "counter"}
        for name in _UNLABELED:  # series that exist from the start, so rate() works from the first scrape
            self._counters[name][()] = 0
        for reason in ("client_disconnect", "timeout", "shutdown"):
            self._counters["rksmolvlm_aborted_generations_total"][(("reason", reason),)] = 0
        self._histograms: dict[str, list] = {name: [[0] * (len(buckets) + 1), 0.0, 0]
                                             for name, (kind, _, buckets) in _METRICS.items() if kind == "histogram"}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + amount

    def observe(self, name: str, value: float) -> None:
        buckets = _METRICS[name][2]
        with self._lock:
            counts, _, _ = entry = self._histograms[name]
            for i, bound in enumerate(buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            entry[1] += value
            entry[2] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 when never incremented)."""
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0)

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict, float]]]]) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text, buckets) in _METRICS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    series = self._counters[name]
                    lines += [f"{name}{_labels(dict(key))} {_num(v)}" for key, v in sorted(series.items())]
                else:
                    counts, total, count = self._histograms[name]
                    running = 0
                    for bound, n in zip((*buckets, "+Inf"), counts):
                        running += n
                        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
                    lines += [f"{name}_sum {_num(total)}", f"{name}_count {count}"]
        for name, (help_text, series) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(labels)} {_num(v)}" for labels, v in series]
        return "\n".join(lines) + "\n"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ==============================================================================================
# systemd: sd_notify over $NOTIFY_SOCKET
# ==============================================================================================
class SystemdNotifier:
    """sd_notify(3) without libsystemd: newline-separated assignments in one datagram to
    ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). A no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._warned = False
        self._stopping = False

    @classmethod
    def from_environ(cls, environ: dict | None = None) -> "SystemdNotifier":
        env = os.environ if environ is None else environ
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())) else None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2 / 1e6 if self.watchdog_usec else None

    def notify(self, message: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(message.encode())
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s (%s)", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        if self._stopping:
            return False
        self._stopping = True
        return self.notify(f"STOPPING=1\nSTATUS={status}")


# ==============================================================================================
# HTTP
# ==============================================================================================
def create_app(service: ModelService, config: ServerConfig, *, api_key: str | None = None,
               notifier: SystemdNotifier | None = None, on_fatal: Callable[[], None] | None = None):
    """The Starlette application; its lifespan starts the service (loading the model) and stops it."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    api = _Api(service, config, api_key, notifier or SystemdNotifier(None), on_fatal)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.retrieve_model, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/health/ready", api.health, methods=["GET"]),
        Route("/health/live", api.live, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/", api.index, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=api.lifespan,
                    exception_handlers={ApiError: api.on_api_error, HTTPException: api.on_http_error})
    app.add_middleware(_RequestLog, api=api)
    app.state.api = api
    return app


class _Api:
    """The endpoints, over one ModelService."""

    def __init__(self, service: ModelService, config: ServerConfig, api_key: str | None,
                 notifier: SystemdNotifier, on_fatal: Callable[[], None] | None):
        self.service = service
        self.config = config
        self.model = service.model
        self.metrics = service.metrics
        self.reader = RequestReader(config, service.model)
        self.api_key = api_key
        self.notifier = notifier
        self.on_fatal = on_fatal
        self.started = time.time()

    # -- lifespan ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loop = asyncio.get_running_loop()
        tasks = []
        self.notifier.status(f"loading {self.model.id} ({self.model.engine} engine)")
        self.service.start(lambda state: loop.call_soon_threadsafe(self._on_state, state))
        if self.notifier.watchdog_interval:
            tasks.append(loop.create_task(self._feed_watchdog(self.notifier.watchdog_interval)))
        try:
            yield
        finally:
            self.notifier.stopping("stopping: finishing the running request")
            for task in tasks:
                task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, self.service.close)
            log.info("stopped")

    def _on_state(self, state: str) -> None:
        if state == "ready":
            log.info("ready: serving %s (%s engine, context %d, queue %d)", self.model.id, self.model.engine,
                     self.model.max_context, self.service.queue_size)
            self.notifier.ready(f"serving {self.model.id} ({self.model.engine} engine)")
        elif state == "failed":
            log.error("loading the model failed: %s", self.service.error)
            self.notifier.status(f"failed: {self.service.error}")
            if self.on_fatal:
                self.on_fatal()

    async def _feed_watchdog(self, interval: float) -> None:
        complained = False
        while True:
            if not self.service.stalled():
                self.notifier.watchdog()
                complained = False
            elif not complained:
                log.error("a generation has made no progress for %.0f s: no longer feeding the systemd watchdog",
                          self.service.stall_timeout_s)
                complained = True
            await asyncio.sleep(interval)

    # -- errors --------------------------------------------------------------------------------
    def error_response(self, request, error: ApiError):
        from starlette.responses import JSONResponse

        self.metrics.inc("rksmolvlm_errors_total", code=error.code)
        _note(request.scope, error=error.code)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def on_api_error(self, request, exc: ApiError):
        return self.error_response(request, exc)

    async def on_http_error(self, request, exc):
        if exc.status_code == 404:
            error = ApiError(404, f"no endpoint at {request.url.path}: use /v1/chat/completions, /v1/models, "
                             "/health or /metrics", "not_found")
        elif exc.status_code == 405:
            error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed",
                             headers=dict(exc.headers or {}))
        else:
            error = ApiError(exc.status_code, str(exc.detail), "http_error")
        return self.error_response(request, error)

    def authorize(self, request) -> None:
        if self.api_key is None:
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="rksmolvlm"'}
        header = request.headers.get("authorization")
        if not header:
            raise ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY' (the key "
                           "is in the file named by the server's server.api_key_file)", "missing_api_key",
                           headers=challenge)
        scheme, _, token = header.partition(" ")
        valid = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not valid:
            raise ApiError(401, "the API key is not valid: send 'Authorization: Bearer KEY' with the key from the "
                           "server's server.api_key_file", "invalid_api_key", headers=challenge)

    # -- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request):
        from starlette.responses import JSONResponse, Response

        self.authorize(request)
        if self.service.state != "ready":
            raise self.service.unavailable()
        request_id = request.scope["state"]["request_id"]
        try:
            body = await _read_body(request, self.config.limits.max_body_bytes)
        except _ClientGone:
            return Response(status_code=499)
        chat = await asyncio.get_running_loop().run_in_executor(None, self.reader.read, body)
        _note(request.scope, images=chat.images, image_bytes=chat.image_bytes, stream=chat.stream,
              max_tokens=chat.config.max_new_tokens)
        job = self.service.submit(chat, asyncio.get_running_loop(), request_id)
        exchange = _Exchange(job, self.service, request.receive, self.config.server.request_timeout_s)
        handed_over = False
        try:
            event = await exchange.next()
            if chat.stream and event[0] != "error":
                handed_over = True
                return _EventStream(self._sse(request, exchange, event, chat),
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while event[0] == "delta":
                event = await exchange.next()
            kind, value = event
            if kind == "error":
                raise value
            self._note_answer(request, value)
            return JSONResponse(self._completion(value, request_id))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not handed_over:
                exchange.close()

    async def _sse(self, request, exchange: "_Exchange", first, chat: ChatRequest) -> AsyncIterator[bytes]:
        request_id = request.scope["state"]["request_id"]
        created = int(time.time())
        base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created,
                "model": self.model.id, "system_fingerprint": _FINGERPRINT}

        def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
            body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if chat.include_usage:
                body["usage"] = None
            body.update(extra)
            return _sse_data(body)

        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                kind, value = event
                if kind == "delta":
                    yield chunk({"content": value})
                elif kind == "done":
                    self._note_answer(request, value)
                    usage = self._usage(value)
                    if chat.include_usage:  # OpenAI's form: a last chunk with no choices
                        yield chunk({}, value.finish_reason)
                        yield _sse_data({**base, "choices": [], "usage": usage, "rksmolvlm": value.extra()})
                    else:
                        yield chunk({}, value.finish_reason, usage=usage, rksmolvlm=value.extra())
                    yield b"data: [DONE]\n\n"
                    return
                elif kind == "error":
                    self.metrics.inc("rksmolvlm_errors_total", code=value.code)
                    _note(request.scope, error=value.code)
                    yield _sse_data(value.body())
                    return
                event = await exchange.next()
        except _ClientGone:
            return
        finally:
            exchange.close()

    def _usage(self, answer: Answer) -> dict:
        completion = len(answer.token_ids)
        return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
                "total_tokens": answer.prompt_tokens + completion}

    def _completion(self, answer: Answer, request_id: str) -> dict:
        return {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model.id, "system_fingerprint": _FINGERPRINT,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                             "finish_reason": answer.finish_reason}],
                "usage": self._usage(answer), "rksmolvlm": answer.extra()}

    @staticmethod
    def _note_answer(request, answer: Answer) -> None:
        _note(request.scope, prompt_tokens=answer.prompt_tokens, completion_tokens=len(answer.token_ids),
              finish=answer.finish_reason, queue_ms=round(answer.queue_ms))

    def _model_card(self) -> dict:
        return {"id": self.model.id, "object": "model", "created": self.model.created, "owned_by": "rksmolvlm",
                "rksmolvlm": {**self.model.details, "aliases": list(self.model.aliases)}}

    async def models(self, request):
        from starlette.responses import JSONResponse

        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request):
        from starlette.responses import JSONResponse

        self.authorize(request)
        if request.path_params["model_id"] not in self.model.names:
            raise ApiError(404, f"the model {request.path_params['model_id']!r} is not served here: use "
                           f"{self.model.id!r}", "model_not_found", "model")
        return JSONResponse(self._model_card())

    async def health(self, request):
        from starlette.responses import JSONResponse

        state = self.service.state
        if state == "ready" and self.service.stalled():
            state = "stalled"
        body = {"status": "ok" if state == "ready" else state, "ready": state == "ready", "model": self.model.id,
                "engine": self.model.engine, "queue": self.service.snapshot(),
                "uptime_s": round(time.time() - self.started, 1), "version": __version__}
        if self.service.error:
            body["error"] = self.service.error
        return JSONResponse(body, status_code=200 if state == "ready" else 503,
                            headers={"Cache-Control": "no-store"})

    async def live(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "alive"})

    async def metrics_text(self, request):
        from starlette.responses import Response

        if self.config.server.metrics_require_key:
            self.authorize(request)
        queue = self.service.snapshot()
        gauges = {
            "rksmolvlm_queue_depth": ("Requests waiting for the model.", [({}, queue["waiting"])]),
            "rksmolvlm_queue_capacity": ("Requests that may wait (server.queue_size).", [({}, queue["capacity"])]),
            "rksmolvlm_busy": ("1 while a request holds the model.", [({}, queue["running"])]),
            "rksmolvlm_ready": ("1 once the model is loaded and not stuck.",
                                [({}, int(self.service.state == "ready" and not self.service.stalled()))]),
            "rksmolvlm_process_resident_memory_bytes": ("Resident memory of the server process.",
                                                        [({}, _rss_bytes())]),
            "rksmolvlm_info": ("The served model and engine.", [({"model": self.model.id, "engine": self.model.engine,
                                                                   "version": __version__}, 1)]),
        }
        return Response(self.metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"name": "rksmolvlm", "version": __version__, "model": self.model.id,
                             "endpoints": ["POST /v1/chat/completions", "GET /v1/models", "GET /health",
                                           "GET /metrics"]})


_FINGERPRINT = f"rksmolvlm-{__version__}"


def _sse_data(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _note(scope, **fields) -> None:
    """Facts about a request for its access-log line (never message text or image bytes)."""
    scope.setdefault("state", {}).setdefault("log", {}).update(fields)


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (after letting the client finish
    sending up to a bound, so it can read the answer)."""
    from starlette.requests import ClientDisconnect

    too_big = ApiError(413, f"the request body is over limits.max_body_bytes = {limit:,} bytes: send smaller or "
                       "fewer images (or raise the limit in the server config)", "request_too_large")
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit or (declared.isdigit() and int(declared) > limit):
                if size > 4 * limit + 65536:
                    break  # stop reading: the connection is dropped after the answer
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        raise _ClientGone from None
    if size > limit or (declared.isdigit() and int(declared) > limit):
        raise too_big
    return b"".join(chunks)


class _Exchange:
    """One job as its HTTP request sees it: the worker's events, the client going away and the
    request's deadline, merged into one stream of events."""

    def __init__(self, job: Job, service: ModelService, receive, timeout_s: float):
        self.job = job
        self.service = service
        self.timeout_s = timeout_s
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch(receive))
        remaining = max(0.0, job.received + timeout_s - time.monotonic())
        self._timer = loop.call_later(remaining, job.events.put_nowait, ("timeout", None))

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.job.events.put_nowait(("gone", None))
                return

    async def next(self) -> tuple[str, object]:
        """The next event: ("delta", text), ("done", Answer) or ("error", ApiError); raises
        _ClientGone after cancelling the job when the client left."""
        kind, value = await self.job.events.get()
        if kind == "gone":
            self.service.cancel(self.job, "client_disconnect")
            raise _ClientGone
        if kind == "timeout":
            self.service.cancel(self.job, "timeout")
            where = ("while running" if self.job.started is not None else "waiting in the queue")
            return "error", ApiError(504, f"the request took longer than server.request_timeout_s = "
                                     f"{self.timeout_s:g} s ({where}) and was stopped: ask for fewer max_tokens or "
                                     "smaller images, or retry when the server is less busy", "request_timeout")
        return kind, value

    def close(self) -> None:
        self._watcher.cancel()
        self._timer.cancel()
        self.service.cancel(self.job, "client_disconnect")  # a no-op once the job has finished


class _EventStream:
    """A text/event-stream response that always closes its generator (cancelling the job) when the
    client goes away or the server stops."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str]):
        self.chunks = chunks
        self.headers = {"content-type": "text/event-stream; charset=utf-8",
                        **{k.lower(): v for k, v in headers.items()}}

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 servers raise when the client has gone
            pass
        finally:
            await self.chunks.aclose()


class _RequestLog:
    """ASGI middleware: request ids, one access-log line per request (sizes and counts, never
    content), request counters, and a JSON 500 without a stack trace for anything unexpected."""

    _PATHS = {"/v1/chat/completions", "/v1/models", "/health", "/health/ready", "/health/live", "/metrics", "/"}

    def __init__(self, app, api: _Api):
        self.app = app
        self.api = api

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - logged with its trace here; the client gets no trace
            log.exception("request %s failed", request_id)
            self.api.metrics.inc("rksmolvlm_errors_total", code="internal_error")
            if not status["code"]:
                error = ApiError(500, f"internal error (request {request_id}): see the server log", "internal_error")
                body = json.dumps(error.body()).encode()
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            path = scope["path"]
            label = path if path in self._PATHS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            code = status["code"] or 499
            self.api.metrics.inc("rksmolvlm_requests_total", path=label, status=str(code))
            if label not in ("/health", "/health/live", "/health/ready", "/metrics") or code >= 400:
                facts = " ".join(f"{k}={v}" for k, v in scope["state"].get("log", {}).items())
                client = scope.get("client") or ("-", 0)
                log.info("%s %s %s %.3fs client=%s id=%s %s", scope["method"], label, code,
                         time.perf_counter() - start, client[0], request_id, facts)


# ==============================================================================================
# Running: uvicorn in the foreground (serve) or in a background thread (tests, scripts)
# ==============================================================================================
def _uvicorn():
    try:
        import uvicorn
    except ImportError as exc:
        raise RkSmolVLMError("serve needs the server packages: pip install 'rksmolvlm[serve]'") from exc
    return uvicorn


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port gives a clear error (and port 0 a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve server.host {host!r} ({exc.strerror}): use an IP address such as "
                          "127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RkSmolVLMError(f"cannot listen on {host}:{port} ({exc.strerror}): another program (or another "
                             "rksmolvlm) uses it; pick another with --port or server.port") from None
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, config: ServerConfig, log_level: str | None = None):
    uvicorn = _uvicorn()
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", http="h11", ws="none",
                          loop="asyncio", limit_concurrency=config.server.max_connections, timeout_keep_alive=5,
                          timeout_graceful_shutdown=10, server_header=False, proxy_headers=False,
                          log_level=log_level or config.server.log_level)


def _server_class():
    uvicorn = _uvicorn()

    class _Server(uvicorn.Server):
        """uvicorn's server, stopping cleanly on SIGTERM/SIGINT: it tells systemd it is stopping,
        finishes, and returns (exit 0) instead of re-raising the signal."""

        notifier: SystemdNotifier | None = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if self.notifier is not None:
                self.notifier.stopping(f"stopping ({signal.Signals(sig).name})")
            if not self.should_exit:
                log.info("%s received: stopping after the running request", signal.Signals(sig).name)
            super().handle_exit(sig, frame)

    return _Server


class BackgroundServer:
    """An app served by uvicorn from a background thread on (by default) a free loopback port:
    for tests, scripts and embedding. ``with BackgroundServer(app) as server: server.url``."""

    def __init__(self, app, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self.app = app
        self.host = host
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        self._server = _server_class()(_uvicorn_config(app, config or ServerConfig(), log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="rksmolvlm-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout: float | None = 120.0) -> "BackgroundServer":
        """Start serving; with ``ready_timeout``, wait until /health says the model is loaded."""
        self._thread.start()
        deadline = time.monotonic() + (ready_timeout or 30.0)
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RkSmolVLMError("the background server did not start")
            time.sleep(0.01)
        if ready_timeout:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                body = json.loads(exc.read() or b"{}")
                if body.get("status") == "failed":
                    raise RkSmolVLMError(f"the model failed to load: {body.get('error')}") from None
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RkSmolVLMError(f"the server at {self.url} was not ready within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ==============================================================================================
# Logging
# ==============================================================================================
class _JournalFormatter(logging.Formatter):
    """journald adds time and unit: prefix the syslog priority (<3> error … <7> debug) instead."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = self._PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def _under_journald(stream) -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
        return value == f"{st.st_dev}:{st.st_ino}"
    except (OSError, ValueError, AttributeError):
        return False


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if _under_journald(sys.stdout):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# ==============================================================================================
# The command
# ==============================================================================================
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (default: bundle in the config file)")
    parser.add_argument("--config", type=Path,
                        help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH} when it exists)")
    parser.add_argument("--no-config", action="store_true", help=f"ignore {DEFAULT_CONFIG_PATH}")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--engine", choices=("auto", "host", "npu"),
                        help="npu on the board, host = x86 preview; auto picks")
    parser.add_argument("--api-key-file", help="file holding the API key clients must send (Authorization: Bearer)")
    parser.add_argument("--queue-size", type=int, help="requests that may wait while one runs (default 4)")
    parser.add_argument("--request-timeout", type=float, help="seconds a request may take, queue included (300)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--library", help="path of librkllmrt.so (default: $RKLLM_LIBRARY, /usr/lib, /usr/local/lib)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    parser.add_argument("--check", action="store_true",
                        help="check the config, the bundle and the API key file, print the settings, and exit")


def resolve_config(args: argparse.Namespace) -> tuple[ServerConfig, str]:
    """The effective config (file, then flags) and where it came from."""
    path = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is None and not args.no_config and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    overrides = {"bundle": str(args.bundle) if args.bundle else None, "engine": args.engine,
                 "rkllm_library": args.library, "verify_bundle": False if args.no_verify else None,
                 "server.host": args.host, "server.port": args.port, "server.api_key_file": args.api_key_file,
                 "server.queue_size": args.queue_size, "server.request_timeout_s": args.request_timeout,
                 "server.log_level": args.log_level}
    source = f"{path} with command-line flags" if path else "command-line flags"
    return with_overrides(config, overrides, source), str(path) if path else "defaults"


def _resolved_engine(engine: str) -> str:
    from .loader import on_rockchip_board

    return ("npu" if on_rockchip_board() else "host") if engine == "auto" else engine


def _check_cores(config: ServerConfig, bundle) -> None:
    if config.npu_cores is None:
        return
    from ..boards import load_profile

    platform = bundle.manifest.get("target", {}).get("platform", "rk3588")
    cores = load_profile(platform).npu_cores
    bad = [c for c in config.npu_cores if c >= cores]
    if bad:
        raise ConfigError(f"npu_cores = {list(config.npu_cores)} names core {bad[0]}, but {platform} has {cores} "
                          f"(0–{cores - 1}): e.g. npu_cores = {list(range(cores))}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_app(config: ServerConfig, *, load: Callable[[object], object] | None = None,
              notifier: SystemdNotifier | None = None, on_fatal: Callable[[], None] | None = None):
    """The application for ``config``: the bundle is opened and checked now, its model is loaded by
    the app's lifespan in the worker thread. ``load(bundle) -> Pipeline`` replaces the default
    (``open_pipeline``), e.g. to wrap an engine. The service is ``app.state.service``."""
    if config.bundle is None:
        raise ConfigError("no bundle to serve: pass BUNDLE, or set bundle = \"/var/lib/rksmolvlm/bundle\" in "
                          f"{DEFAULT_CONFIG_PATH}")
    from .loader import RuntimeBundle

    bundle = RuntimeBundle.open(config.bundle, verify=config.verify_bundle)
    engine = _resolved_engine(config.engine)
    _check_cores(config, bundle)
    server = config.server
    api_key = read_api_key(server.api_key_file) if server.api_key_file else None
    model = ServedModel.from_bundle(bundle, server.model_name, engine)
    load = load or (lambda b: open_pipeline(b, config, engine))
    service = ModelService(lambda: load(bundle), model, server.queue_size, Metrics(), server.stall_timeout_s)
    app = create_app(service, config, api_key=api_key, notifier=notifier, on_fatal=on_fatal)
    app.state.service = service
    app.state.bundle = bundle
    return app


def serve_command(args: argparse.Namespace) -> int:
    config, source = resolve_config(args)
    _configure_logging(config.server.log_level)
    from PIL import Image

    # Requests are held to limits.max_image_pixels (a 400 naming the limit), so Pillow's own warning is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if config.bundle is None and source != "defaults":
        raise ConfigError(f"no bundle to serve: pass BUNDLE, or set bundle = \"...\" in {source}")
    server = config.server
    notifier = SystemdNotifier.from_environ()
    uvicorn_server = None

    def fatal() -> None:
        if uvicorn_server is not None:
            uvicorn_server.should_exit = True

    app = build_app(config, notifier=notifier, on_fatal=fatal)
    service, bundle = app.state.service, app.state.bundle
    api_key = app.state.api.api_key
    if args.check:
        print(f"config: {source}\nbundle: {bundle.path} ({service.model.id}, context {bundle.max_context})\n"
              f"engine: {service.model.engine}\nlisten: {server.host}:{server.port}\n"
              f"api key: {'required' if api_key else 'none (anyone who can connect may use the model)'}\n"
              f"queue: {server.queue_size} waiting, timeout {server.request_timeout_s:g} s\n"
              f"limits: {json.dumps(config.to_dict()['limits'])}\nok")
        return 0
    if api_key is None and not _is_loopback(server.host):
        log.warning("listening on %s without an API key: anyone on the network can use the model; set "
                    "server.api_key_file", server.host)
    sock = _listen(server.host, server.port)
    uvicorn_server = _server_class()(_uvicorn_config(app, config))
    uvicorn_server.notifier = notifier
    host, port = sock.getsockname()[:2]
    log.info("rksmolvlm %s: config %s; listening on http://%s:%d; loading %s (%s engine)%s", __version__, source,
             host, port, bundle.path, service.model.engine, "; API key required" if api_key else "")
    try:
        uvicorn_server.run(sockets=[sock])
    finally:
        sock.close()
    if service.state == "failed" or service.exit_code:
        return service.exit_code or 1
    return 0
