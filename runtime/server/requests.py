"""Requests: the JSON body of a chat completion → a checked ChatRequest, every limit (body, JSON,
parameters, image type, bytes and pixel count) checked before the request may queue; ApiError is
the OpenAI-style error every refusal is answered with."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rksmolvlm import __version__
from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.runtime.server_config import ServerConfig

if TYPE_CHECKING:  # the module is imported for `rksmolvlm --help`: numpy and friends load on use
    from rksmolvlm.processing.content import Message
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle

__all__ = ["ApiError", "ChatRequest", "ServedModel", "RequestReader", "IMAGE_TYPES"]

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


# ==============================================================================================
# Requests: JSON body → ChatRequest, every limit checked before the request may queue
# ==============================================================================================
@dataclass
class ChatRequest:
    """A checked chat completion request: typed messages (image parts carry the image bytes) and
    the generation options, stop strings included."""

    messages: list[Message]
    config: GenerationConfig
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
    def from_bundle(cls, bundle: RuntimeBundle, name: str | None, engine: str) -> "ServedModel":
        from rksmolvlm.manifest import MANIFEST

        manifest = bundle.manifest
        source = manifest.source.model_id or bundle.path.name
        created = int(bundle.path.joinpath(MANIFEST).stat().st_mtime)
        details = {"family": manifest.model.family, "size": manifest.model.size,
                   "target": manifest.target.platform,
                   "vision_dtype": manifest.vision.dtype if manifest.vision else None,
                   "llm_dtype": manifest.llm.dtype if manifest.llm else None,
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
        config = self._generation(payload, self._stops(payload.get("stop")))
        drafts = self._messages(payload.get("messages"))
        refs = [part for _, parts in drafts for part in parts if isinstance(part, _ImageRef)]
        if len(refs) > self.limits.max_images:
            raise ApiError(400, f"the request has {len(refs)} images, over limits.max_images = "
                           f"{self.limits.max_images}: send at most {self.limits.max_images} per request",
                           "too_many_images", "messages")
        images = {ref: self._image(ref.url, ref.param) for ref in refs}  # refs differ by param
        messages = [_message(role, parts, images) for role, parts in drafts]
        return ChatRequest(messages, config, stream, include_usage, len(refs), sum(map(len, images.values())))

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

    def _generation(self, payload: dict, stops: tuple[str, ...]) -> GenerationConfig:
        from rksmolvlm.runtime.engines import GenerationConfig

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
                                seed=seed, stop=stops)

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

    def _messages(self, messages) -> list[tuple[str, list]]:
        """(role, parts) per message, checked; a part is a TextPart or an _ImageRef still to fetch."""
        from rksmolvlm.processing.content import TextPart

        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array of {\"role\", \"content\"} objects",
                           "invalid_value" if isinstance(messages, list) else "missing_required_parameter",
                           "messages")
        out = []
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
                out.append((_ROLES[role], [TextPart(content or "")]))
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
                    parts.append(TextPart(text))
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise ApiError(400, f"{param}.image_url must be {{\"url\": \"data:image/png;base64,…\"}}",
                                       "invalid_type", f"{param}.image_url")
                    parts.append(_ImageRef(url, f"{param}.image_url"))
                else:
                    raise ApiError(400, f"{param} has type {kind!r}: use 'text' or 'image_url'", "invalid_value",
                                   f"{param}.type")
            out.append((_ROLES[role], parts))
        return out

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


@dataclass(frozen=True)
class _ImageRef:
    """An image part as the request names it, before it is fetched and checked."""

    url: str
    param: str


def _message(role: str, parts: list, images: dict[_ImageRef, bytes]) -> "Message":
    from rksmolvlm.processing.content import ImagePart, Message

    return Message(role, tuple(ImagePart(images[p]) if isinstance(p, _ImageRef) else p for p in parts))


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
