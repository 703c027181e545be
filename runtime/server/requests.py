"""Requests: the JSON body of a chat completion → a checked ChatRequest, every limit (body, JSON,
parameters, image type, bytes and pixel count; a video's bytes and its container's duration, frame
count and frame size) checked before the request may queue; ApiError is the OpenAI-style error every
refusal is answered with.

Videos (SmolVLM2 bundles) come as vLLM's ``{"type": "video_url", "video_url": {"url": …}}`` parts,
from the same sources as images (data: URIs, files under images.local_dir, remote URLs when allowed);
their sampling is the part's ``video_url.fps``/``max_frames``, else the request's vLLM-style
``mm_processor_kwargs`` (``fps``, ``num_frames`` or ``max_frames``), else the server's ``[video]``
defaults — a max_frames above the checkpoint's own limit is capped by the runner.

Images' resolution budget: the request's ``mm_processor_kwargs`` may also hold the image processor's
``size`` (``{"longest_edge": N}``, N a multiple of the tile size), ``max_tiles`` (our extension: the
most split tiles per image) and ``do_image_splitting`` (false: one tile per image); absent, the
server's images.longest_edge / images.max_tiles apply. An image's ``detail`` "low" is still one tile."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rksmolvlm import __version__
from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.runtime.server.config import ServerConfig

if TYPE_CHECKING:  # the module is imported for `rksmolvlm --help`: numpy and friends load on use
    from rksmolvlm.processing.content import Message
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle

__all__ = ["ApiError", "ChatRequest", "ServedModel", "RequestReader", "IMAGE_TYPES", "VIDEO_STATUS", "video_api_error",
           "video_decoder_available"]

# MIME type → Pillow format; nothing else is ever handed to the decoder.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP", "image/tiff": "TIFF"}
_PIL_FORMATS = tuple(sorted(set(IMAGE_TYPES.values())))
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TOOL_ROLES = ("tool", "function")  # a tool's result (legacy: function), rendered as user text
_MAX_STOPS = 4
# The DecodeLimits field an image is over → the config key that sets it (in refusal messages).
_DECODE_LIMIT_KEYS = {"max_decode_bytes": "limits.max_decode_bytes", "max_jpeg_scans": "limits.max_jpeg_scans",
                      "max_pixels": "limits.max_image_pixels"}
_MAX_STOP_CHARS = 64  # the text stream holds back any prefix of a stop string: keep them short
_MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64
_SURROGATE = re.compile("[\ud800-\udfff]")
_URL_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream", "")
# A VideoError whose limit is the byte size is a 413, as an image over its byte limit; every other one a 400.
VIDEO_STATUS = {"max_bytes": 413}
_MM_KWARGS = ("fps", "num_frames", "max_frames")  # what mm_processor_kwargs may hold (vLLM's names and ours)
_MM_IMAGE_KWARGS = ("size", "max_tiles", "do_image_splitting")  # and for images: see the module docstring
_MAX_FPS = 1000.0  # rksmolvlm.processing.content.VideoPart's bound
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


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
    videos: int = 0
    video_bytes: int = 0


@dataclass(frozen=True)
class ServedModel:
    """What the server says about its model: the id clients name, and the bundle's facts."""

    id: str
    aliases: tuple[str, ...]
    max_context: int
    created: int
    engine: str
    details: dict = field(default_factory=dict)
    video: dict | None = None  # the checkpoint's video sampling (fps, max_frames, …); None: the model takes no video

    @classmethod
    def from_bundle(cls, bundle: RuntimeBundle, name: str | None, engine: str) -> "ServedModel":
        from rksmolvlm.bundle.manifest import MANIFEST

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
        video = manifest.video.settings if manifest.video is not None else None
        sampling = None if video is None else {"fps": video.fps, "max_frames": video.max_frames,
                                               "skip_secs": video.skip_secs, "frame_size": video.frame_size}
        return cls(ident, aliases, bundle.max_context, created, engine, details, sampling)

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
        return self.read_payload(_parse_json(body))

    def read_payload(self, payload: dict) -> ChatRequest:
        """A chat completion body already parsed from JSON (the Ollama endpoints translate theirs into one)."""
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
        sampling = _mm_processor_kwargs(payload.get("mm_processor_kwargs"))
        budget = _image_budget(payload.get("mm_processor_kwargs"))
        self._check_sizes(payload.get("messages"))
        drafts = self._messages(payload.get("messages"))
        refs = [part for _, parts in drafts for part in parts if isinstance(part, _ImageRef)]
        if len(refs) > self.limits.max_images:
            raise ApiError(400, f"the request has {len(refs)} images, over limits.max_images = "
                           f"{self.limits.max_images}: send at most {self.limits.max_images} per request",
                           "too_many_images", "messages")
        clips = [part for _, parts in drafts for part in parts if isinstance(part, _VideoRef)]
        self._check_video_count(clips)
        images = {ref: self._image(ref.url, ref.param) for ref in refs}  # refs differ by param
        videos = {ref: self._video(ref.url, ref.param) for ref in clips}
        messages = [_message(role, parts, images, videos, sampling, budget) for role, parts in drafts]
        return ChatRequest(messages, config, stream, include_usage, len(refs), sum(map(len, images.values())),
                           len(clips), sum(map(len, videos.values())))

    # -- fields ----------------------------------------------------------------------------------
    def _check_model(self, model) -> None:
        if model is None:
            return  # the server has one model; curl users may leave it out
        if not isinstance(model, str):
            raise ApiError(400, "model must be a string", "invalid_type", "model")
        if self.config.server.strict_model_name and model not in self.model.names:
            raise ApiError(404, f"the model {_shown(model)} is not served here: use {self.model.id!r} "
                           "(GET /v1/models lists it)", "model_not_found", "model")

    @staticmethod
    def _refuse_unsupported(payload: dict) -> None:
        n = payload.get("n", 1)
        if n not in (1, None):
            raise ApiError(400, "n must be 1: this server makes one answer per request (send several requests)",
                           "unsupported_value", "n")
        # tools (legacy: functions) are ignored and the answer is text, unless the request demands a call
        for choice_name in ("tool_choice", "function_call"):
            choice = payload.get(choice_name)
            if choice not in (None, "none", "auto"):
                raise ApiError(400, f"{choice_name} = {_shown(choice)} demands a tool call, which SmolVLM cannot make: "
                               f"leave {choice_name} out or set it to \"auto\" or \"none\" (the tools are then "
                               "ignored and the answer is text)", "unsupported_value", choice_name)
        if payload.get("logprobs"):
            raise ApiError(400, "logprobs are not supported: leave logprobs out (token ids are in the response's "
                           "'rksmolvlm' field)", "unsupported_parameter", "logprobs")
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
        # Never refused for being large: capped to limits.max_tokens here and by the runner to the room the
        # prompt leaves in the context (cap_to_context); absent → default_max_tokens, 0 = until the context ends.
        default = limits.default_max_tokens or limits.max_tokens
        max_tokens = min(_int(payload, name, default, 1, None), limits.max_tokens)
        temperature = _number(payload, "temperature", 0.0, 0.0, 2.0)
        top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise ApiError(400, "top_p must be above 0 (use temperature 0 for greedy decoding)", "invalid_value",
                           "top_p")
        top_k = min(_int(payload, "top_k", 0, 0, None), 2**31 - 1)  # librkllmrt's top_k is an int32
        seed = _int(payload, "seed", None, -_MAX_SEED - 1, _MAX_SEED)
        frequency = _number(payload, "frequency_penalty", 0.0, -2.0, 2.0)
        presence = _number(payload, "presence_penalty", 0.0, -2.0, 2.0)
        return GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stops, frequency_penalty=frequency, presence_penalty=presence,
                                cap_to_context=True)

    @staticmethod
    def _stops(stop) -> tuple[str, ...]:
        if stop is None:
            return ()
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "stop must be a string or an array of strings", "invalid_type", "stop")
        if len(stops) > _MAX_STOPS:
            raise ApiError(400, f"stop has {len(stops)} strings: send at most {_MAX_STOPS}", "invalid_value", "stop")
        if any(len(s) > _MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"a stop string is {max(map(len, stops)):,} characters: send stop strings of at most "
                           f"{_MAX_STOP_CHARS}", "invalid_value", "stop")
        return tuple(_clean(s) for s in stops if s)

    def _messages(self, messages) -> list[tuple[str, list]]:
        """(role, parts) per message, checked; a part is a TextPart, or an _ImageRef or _VideoRef still to fetch.

        Tool history (clients that offer tools keep it even though SmolVLM never calls one): a tool's
        result becomes a user message "Tool result: …"; an assistant's tool_calls are dropped (its
        text stays; a message with nothing else is dropped whole)."""
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
            if not isinstance(role, str) or (role not in _ROLES and role not in _TOOL_ROLES):
                raise ApiError(400, f"{where}.role is {_shown(role)}: use system, user, assistant or tool",
                               "invalid_value", f"{where}.role")
            parts = self._parts(message.get("content"), where)
            if role in _TOOL_ROLES:
                name = message.get("name")
                label = f"Tool result ({_clean(name)}):" if isinstance(name, str) and 0 < len(name) <= 64 else \
                    "Tool result:"
                out.append(("user", [TextPart(label + "\n"), *parts]))
            elif role == "assistant" and (message.get("tool_calls") or message.get("function_call")) \
                    and not any(not isinstance(p, TextPart) or p.text.strip() for p in parts):
                continue  # only calls another model made: nothing SmolVLM can read or continue
            else:
                out.append((_ROLES[role], parts))
        if not out:
            raise ApiError(400, "messages hold only tool calls: send at least one message with content",
                           "invalid_value", "messages")
        return out

    def _parts(self, content, where: str) -> list:
        """A message's content (a string, or an array of text, image and video parts) as TextParts, _ImageRefs
        and _VideoRefs."""
        from rksmolvlm.processing.content import TextPart

        if content is None or isinstance(content, str):
            return [TextPart(_clean(content or ""))]
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or an array of parts", "invalid_type",
                           f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text"):  # input_text: OpenAI's Responses API
                text = part.get("text")
                if not isinstance(text, str):
                    raise ApiError(400, f"{param}.text must be a string", "invalid_type", f"{param}.text")
                parts.append(TextPart(_clean(text)))
            elif kind in ("image_url", "input_image"):  # input_image: {"image_url": "data:…"} (Responses API)
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{param}.image_url must be {{\"url\": \"data:image/png;base64,…\"}}",
                                   "invalid_type", f"{param}.image_url")
                # detail: inside image_url (Chat Completions) or beside it (input_image); "auto" when absent
                detail = ref.get("detail") if isinstance(ref, dict) else part.get("detail")
                if detail is not None and detail not in _DETAILS:
                    where_detail = f"{param}.image_url.detail" if isinstance(ref, dict) else f"{param}.detail"
                    raise ApiError(400, f"{where_detail} is {_shown(detail)}: use \"low\" (one tile), \"high\" (the "
                                   "image split into tiles) or \"auto\"", "invalid_value", where_detail)
                parts.append(_ImageRef(_checked_url(url, f"{param}.image_url"), f"{param}.image_url",
                                       detail or "auto"))
            elif kind == "video_url":  # vLLM's video part: {"video_url": {"url": …, "fps"?, "max_frames"?}}
                ref = part.get("video_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{param}.video_url must be {{\"url\": \"data:video/mp4;base64,…\"}}",
                                   "invalid_type", f"{param}.video_url")
                own = ref if isinstance(ref, dict) else {}
                parts.append(_VideoRef(_checked_video_url(url, f"{param}.video_url"), f"{param}.video_url",
                                       _fps(own.get("fps"), f"{param}.video_url.fps"),
                                       _max_frames(own.get("max_frames"), f"{param}.video_url.max_frames")))
            else:
                raise ApiError(400, f"{param} has type {_shown(kind)}: use 'text' or 'image_url' (or 'video_url' for a "
                               "model that takes video)", "invalid_value", f"{param}.type")
        return parts

    # -- sizes: what the template and the tokenizer would pay for, refused before any work --------------
    def _check_sizes(self, messages) -> None:
        """Message, part and text counts of the raw messages (before they are read: a 19 MB prompt
        would hold the tokenizer, and the GIL, for seconds)."""
        limits = self.limits
        if not isinstance(messages, list):
            return  # _messages names the problem
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"the request has {len(messages):,} messages, over limits.max_messages = "
                           f"{limits.max_messages:,}: send a shorter conversation", "too_many_messages", "messages")
        chars = 0
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                if len(content) > limits.max_parts:
                    raise ApiError(400, f"messages[{i}] has {len(content):,} content parts, over limits.max_parts = "
                                   f"{limits.max_parts:,}: join its text parts", "too_many_parts",
                                   f"messages[{i}].content")
                chars += sum(len(part["text"]) for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
        limit = limits.max_text_chars or 8 * self.model.max_context
        if chars > limit:
            where = "limits.max_text_chars" if limits.max_text_chars else \
                f"8 a token of the model's context of {self.model.max_context:,}; limits.max_text_chars sets it"
            raise ApiError(400, f"the messages hold {chars:,} characters of text, over the {limit:,} allowed "
                           f"({where}): send less text", "text_too_long", "messages")

    # -- images ----------------------------------------------------------------------------------
    def _media(self, url: str, param: str, kind: str, from_data_uri, from_remote) -> bytes:
        """The bytes of an image or video URL: a data: URI, a remote URL or a local file."""
        if url.startswith("data:"):
            return from_data_uri(url, param)
        if url.startswith(("http://", "https://")):
            return from_remote(url, param)
        if url.startswith("file://") or url.startswith("/"):
            return self._from_local(url, param, kind)
        scheme = url.split(":", 1)[0][:16] if ":" in url else "a relative path"
        example = "data:image/png;base64,…" if kind == "image" else "data:video/mp4;base64,…"
        raise ApiError(400, f"{param}: {scheme!r} {kind}s are not supported: send a data: URI ({example})",
                       f"invalid_{kind}_url", param)

    def _image(self, url: str, param: str) -> bytes:
        data = self._media(url, param, "image", self._from_data_uri, self._from_remote)
        self._check_image(data, param)
        return data

    def _too_big(self, size: int | str, param: str, what: str = "image") -> ApiError:
        shown = size if isinstance(size, str) else f"{size:,}"
        if what == "video":
            return ApiError(413, f"{param} is {shown} bytes, over video.max_bytes = {self.config.video.max_bytes:,}: "
                            "send a shorter or more compressed video", "video_too_large", param)
        return ApiError(413, f"{param} is {shown} bytes, over limits.max_image_bytes = "
                        f"{self.limits.max_image_bytes:,}: send a smaller image (downscale or compress it)",
                        "image_too_large", param)

    def _max_bytes(self, what: str) -> int:
        return self.config.video.max_bytes if what == "video" else self.limits.max_image_bytes

    def _from_data_uri(self, url: str, param: str) -> bytes:
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise ApiError(400, f"{param} is not a valid data: URI: write data:image/png;base64,<base64 bytes>",
                           "invalid_image_url", param)
        fields = [f.strip().lower() for f in header.split(";")]
        mime = fields[0] or "text/plain"
        if mime.startswith("video/"):
            raise ApiError(400, f"{param} has the type {mime[:64]!r}: a video goes in a video_url part, "
                           "{\"type\": \"video_url\", \"video_url\": {\"url\": \"data:video/mp4;base64,…\"}}",
                           "unsupported_image_type", param)
        if mime not in IMAGE_TYPES:
            raise ApiError(400, f"{param} has the type {mime[:64]!r}: send image/png, image/jpeg, image/webp, "
                           "image/gif, image/bmp or image/tiff", "unsupported_image_type", param)
        if "base64" not in fields[1:]:
            raise ApiError(400, f"{param} must be base64-encoded: write data:{mime};base64,<base64 bytes>",
                           "invalid_image_url", param)
        if len(payload) // 4 * 3 > self.limits.max_image_bytes + 3:
            raise self._too_big(f"about {len(payload) // 4 * 3:,}", param)
        return _base64(payload, param, "image")

    def _from_local(self, url: str, param: str, what: str = "image") -> bytes:
        """A file under images.local_dir (images and videos alike), read up to the byte limit of ``what``."""
        root = self.config.images.local_dir
        example = "data:video/mp4;base64,…" if what == "video" else "data:image/png;base64,…"
        if not root:
            raise ApiError(400, f"{param}: local {what} paths are off: send the {what} as a data: URI ({example}), "
                           "or set images.local_dir in the server config to the directory they may come from",
                           f"local_{what}s_disabled", param)
        if url.startswith("file://"):
            parsed = urllib.parse.urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise ApiError(400, f"{param}: file URLs must name this machine (file:///path)", f"invalid_{what}_url",
                               param)
            text = urllib.parse.unquote(parsed.path)
        else:
            text = url
        if "\x00" in text:  # %00 in a file URL: the OS cannot take it (ValueError, not OSError)
            raise ApiError(400, f"{param} holds a NUL character: send a plain path", f"invalid_{what}_url", param)
        path = Path(text).resolve()
        base = Path(root).resolve()
        if not path.is_relative_to(base):
            raise ApiError(400, f"{param} is outside images.local_dir ({root}): only {what}s under it may be read",
                           f"{what}_path_not_allowed", param)
        limit = self._max_bytes(what)
        try:  # O_NONBLOCK: a FIFO under local_dir must not block the reader; only regular files are read
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    article = "a video" if what == "video" else "an image"
                    raise ApiError(400, f"{param} is not a regular file: name {article} file under images.local_dir",
                                   f"invalid_{what}", param)
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ApiError(400, f"{param}: no such file under images.local_dir", f"invalid_{what}", param) from None
        except OSError as exc:
            raise ApiError(400, f"{param}: cannot read the file ({exc.strerror})", f"invalid_{what}", param) from None
        if len(data) > limit:
            raise self._too_big(f"over {limit:,}", param, what)
        return data

    def _from_remote(self, url: str, param: str) -> bytes:
        """An http(s) image, fetched within images.remote_timeout_s in all (runtime/server/remote.py: only
        public addresses unless images.allow_private_networks, checked redirects, generic errors)."""
        from rksmolvlm.runtime.server.remote import FetchError, fetch_image

        images = self.config.images
        if not images.allow_remote:
            raise ApiError(400, f"{param}: remote image URLs are off (images.allow_remote = false): send the image "
                           "as a data: URI (data:image/png;base64,…)", "remote_images_disabled", param)
        limit = self.limits.max_image_bytes
        try:
            fetched = fetch_image(url, timeout_s=images.remote_timeout_s, max_bytes=limit,
                                  allow_private=images.allow_private_networks, user_agent=f"rksmolvlm/{__version__}")
        except FetchError as exc:
            raise ApiError(exc.status, f"{param}: {exc}", exc.code, param) from None
        if fetched.content_type not in IMAGE_TYPES:
            raise ApiError(400, f"{param}: the remote server did not answer with an image type (PNG, JPEG, WebP, "
                           "GIF, BMP or TIFF)", "unsupported_image_type", param)
        if fetched.content_length is not None and fetched.content_length > limit:
            raise self._too_big(fetched.content_length, param)
        if len(fetched.data) > limit:
            raise self._too_big(f"over {limit:,}", param)
        return fetched.data

    def _check_image(self, data: bytes, param: str) -> None:
        """Type, size, pixel count, side, decode memory and a JPEG's scan count from the header and the
        marker structure only: nothing is decoded here (rksmolvlm.processing.image_safety)."""
        from PIL import Image, UnidentifiedImageError

        from rksmolvlm.errors import ImageError
        from rksmolvlm.processing.image_safety import DecodeLimits, check_decodable, check_jpeg

        limit = self.limits.max_image_pixels
        if not data:
            raise ApiError(400, f"{param}: the image is empty (0 bytes): send the image file's contents",
                           "invalid_image", param)
        if len(data) > self.limits.max_image_bytes:
            raise self._too_big(len(data), param)
        limits = DecodeLimits(max_pixels=limit, max_decode_bytes=self.limits.max_decode_bytes,
                              max_jpeg_scans=self.limits.max_jpeg_scans)
        try:
            jpeg = check_jpeg(data, limits)  # before Pillow walks the markers itself
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as image:
                width, height = image.size
                if width * height <= limit:
                    check_decodable(image, limits, jpeg, data)
        except ImageError as exc:
            key = _DECODE_LIMIT_KEYS.get(exc.limit)
            raise ApiError(400, f"{param}: {exc}" + (f" (the server's {key})" if key else ""), exc.code,
                           param) from None
        except Image.DecompressionBombError:
            raise ApiError(400, f"{param} has more pixels than limits.max_image_pixels = {limit:,} (refused before "
                           "decoding): downscale it", "image_too_many_pixels", param) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            if _looks_like_video(data):
                raise ApiError(400, f"{param} is a video, not an image: send it as a video_url part of POST "
                               "/v1/chat/completions (the Ollama API has no field for videos)",
                               "unsupported_image_type", param) from None
            raise ApiError(400, f"{param} cannot be read as a PNG, JPEG, WebP, GIF, BMP or TIFF image: the data is "
                           "corrupt or in another format", "invalid_image", param) from None
        if width * height > limit:
            raise ApiError(400, f"{param} is {width}×{height} = {width * height:,} pixels, over "
                           f"limits.max_image_pixels = {limit:,}: downscale it", "image_too_many_pixels", param)


    # -- videos ----------------------------------------------------------------------------------
    def _check_video_count(self, clips: list["_VideoRef"]) -> None:
        """Videos are wanted: the model takes them, the server allows them, not too many — refused
        before any video is fetched."""
        if not clips:
            return
        param = clips[0].param
        if self.model.video is None:
            raise ApiError(400, f"{param}: this model ({self.model.id}) does not take video (only SmolVLM2 "
                           "checkpoints do): send frames as image_url parts, or serve a bundle converted from a "
                           "SmolVLM2 checkpoint", "video_not_supported", param)
        video = self.config.video
        if not video.enabled:
            raise ApiError(400, f"{param}: video input is off on this server (video.enabled = false): send frames as "
                           "image_url parts", "video_disabled", param)
        if not video_decoder_available():
            raise ApiError(501, f"{param}: this server cannot read videos: PyAV is not installed (pip install av on "
                           "the server)", "video_decoder_missing", param, "server_error")
        if len(clips) > video.max_videos:
            raise ApiError(400, f"the request has {len(clips)} videos, over video.max_videos = {video.max_videos}: "
                           f"send at most {video.max_videos} per request", "too_many_videos", "messages")

    def _video(self, url: str, param: str) -> bytes:
        data = self._media(url, param, "video", self._video_from_data_uri, self._video_from_remote)
        self._check_video(data, param)
        return data

    def _video_from_data_uri(self, url: str, param: str) -> bytes:
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise ApiError(400, f"{param} is not a valid data: URI: write data:video/mp4;base64,<base64 bytes>",
                           "invalid_video_url", param)
        fields = [f.strip().lower() for f in header.split(";")]
        mime = fields[0]
        if not (mime.startswith("video/") or mime in _GENERIC_TYPES):  # the container is read from the bytes
            hint = "an image goes in an image_url part" if mime.startswith("image/") else "send a video"
            raise ApiError(400, f"{param} has the type {mime[:64]!r}: {hint} (data:video/mp4;base64,…; any video/* "
                           "type)", "unsupported_video_type", param)
        if "base64" not in fields[1:]:
            raise ApiError(400, f"{param} must be base64-encoded: write data:{mime or 'video/mp4'};base64,<base64 "
                           "bytes>", "invalid_video_url", param)
        limit = self.config.video.max_bytes
        if len(payload) // 4 * 3 > limit + 3:
            raise self._too_big(f"about {len(payload) // 4 * 3:,}", param, "video")
        return _base64(payload, param, "video")

    def _video_from_remote(self, url: str, param: str) -> bytes:
        """An http(s) video, fetched as remote images are (runtime/server/remote.py), up to video.max_bytes."""
        from rksmolvlm.runtime.server.remote import FetchError, fetch

        images = self.config.images
        if not images.allow_remote:
            raise ApiError(400, f"{param}: remote video URLs are off (images.allow_remote = false): send the video "
                           "as a data: URI (data:video/mp4;base64,…)", "remote_videos_disabled", param)
        limit = self.config.video.max_bytes
        try:
            fetched = fetch(url, timeout_s=images.remote_timeout_s, max_bytes=limit, what="video",
                            allow_private=images.allow_private_networks, user_agent=f"rksmolvlm/{__version__}")
        except FetchError as exc:
            raise ApiError(exc.status, f"{param}: {exc}", exc.code, param) from None
        kind = fetched.content_type
        if not (kind.startswith("video/") or kind in _GENERIC_TYPES):
            raise ApiError(400, f"{param}: the remote server did not answer with a video type (video/*)",
                           "unsupported_video_type", param)
        if fetched.content_length is not None and fetched.content_length > limit:
            raise self._too_big(fetched.content_length, param, "video")
        if len(fetched.data) > limit:
            raise self._too_big(f"over {limit:,}", param, "video")
        return fetched.data

    def _check_video(self, data: bytes, param: str) -> None:
        """Size, then the container read without decoding a frame (rksmolvlm.processing.video.probe_video):
        a video stream, its duration, frame count and frame size within the [video] limits."""
        from rksmolvlm.errors import VideoError
        from rksmolvlm.processing.video import probe_video

        if not data:
            raise ApiError(400, f"{param}: the video is empty (0 bytes): send the video file's contents",
                           "invalid_video", param)
        if len(data) > self.config.video.max_bytes:
            raise self._too_big(len(data), param, "video")
        try:
            probe_video(data, self.config.video.limits())
        except VideoError as exc:
            raise video_api_error(exc, param) from None


@functools.lru_cache(maxsize=1)
def video_decoder_available() -> bool:
    """PyAV is installed (looked up, not imported: the import is paid while the model loads)."""
    import importlib.util

    return importlib.util.find_spec("av") is not None


def video_api_error(exc, param: str | None) -> ApiError:
    """A VideoError as the API answers it: its code, 413 for the byte limit else 400, the message naming the
    server's config key of the limit it is over."""
    limit = getattr(exc, "limit", None)
    key = f" (the server's video.{limit})" if limit else ""
    where = f"{param}: " if param else ""
    return ApiError(VIDEO_STATUS.get(limit, 400), f"{where}{exc}{key}", exc.code, param)


_DETAILS = ("auto", "low", "high")  # rksmolvlm.processing.content.DETAILS, without importing Pillow here


@dataclass(frozen=True)
class _ImageRef:
    """An image part as the request names it, before it is fetched and checked."""

    url: str
    param: str
    detail: str = "auto"


@dataclass(frozen=True)
class _VideoRef:
    """A video part as the request names it, before it is fetched and checked: its own sampling, if any."""

    url: str
    param: str
    fps: float | None = None
    max_frames: int | None = None


def _checked_video_url(url: str, param: str) -> str:
    """A video URL fit to be fetched: no control characters (a data: URI's base64 may be wrapped in lines, but
    holds no NUL)."""
    bad = "\x00" in url if url.startswith("data:") else _URL_CONTROL.search(url) is not None
    if bad:
        raise ApiError(400, f"{param} holds control characters (NUL, CR, LF, …) or invalid Unicode: send a plain "
                       "URL or path, or standard base64", "invalid_video_url", param)
    return url


def _fps(value, param: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"{param} must be a number (frames sampled per second of video)", "invalid_type", param)
    if not 0 < value <= _MAX_FPS:
        raise ApiError(400, f"{param} = {_shown(value)} is out of range: use a number above 0 and at most "
                       f"{_MAX_FPS:g} (frames sampled per second of video; 1 samples one frame a second)",
                       "invalid_value", param)
    return float(value)


def _max_frames(value, param: str) -> int | None:
    """A whole number of at least 1; a large one is kept (the runner caps it to the checkpoint's limit)."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{param} must be an integer (the most frames sampled from the video)", "invalid_type",
                       param)
    if value < 1:
        raise ApiError(400, f"{param} = {_shown(value)} is out of range: use at least 1 (larger values are capped to "
                       "the model's own limit)", "invalid_value", param)
    return min(value, 2**31 - 1)


def _mm_processor_kwargs(value) -> tuple[float | None, int | None]:
    """vLLM's top-level ``mm_processor_kwargs``: the (fps, max_frames) every video of the request gets unless
    its video_url says otherwise. ``num_frames`` (vLLM's name) and ``max_frames`` mean the same here: the
    most frames sampled (fewer when fps × duration is less)."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        raise ApiError(400, "mm_processor_kwargs must be an object like {\"fps\": 1, \"num_frames\": 16}",
                       "invalid_type", "mm_processor_kwargs")
    for name in value:
        if name not in _MM_KWARGS + _MM_IMAGE_KWARGS:
            where = f"mm_processor_kwargs.{str(name)[:40]}"
            raise ApiError(400, f"{where} is not supported: this server reads fps, num_frames (or max_frames), size "
                           "({\"longest_edge\": N}), max_tiles and do_image_splitting there", "unsupported_parameter",
                           where)
    counts = {name: _max_frames(value.get(name), f"mm_processor_kwargs.{name}")
              for name in ("num_frames", "max_frames")}
    if None not in counts.values() and counts["num_frames"] != counts["max_frames"]:
        raise ApiError(400, "mm_processor_kwargs has both num_frames and max_frames, with different values: send "
                       "one of them", "invalid_value", "mm_processor_kwargs.max_frames")
    frames = counts["max_frames"] if counts["max_frames"] is not None else counts["num_frames"]
    return _fps(value.get("fps"), "mm_processor_kwargs.fps"), frames


def _image_budget(value) -> dict | None:
    """The images' resolution keys of ``mm_processor_kwargs`` (checked by ``_mm_processor_kwargs`` to
    be an object): a dict of Resolution fields, or None when it sets none."""
    if not isinstance(value, dict) or not any(name in value for name in _MM_IMAGE_KWARGS):
        return None
    budget = {}
    size = value.get("size")
    if size is not None:
        edge = size.get("longest_edge") if isinstance(size, dict) and set(size) == {"longest_edge"} else None
        if isinstance(edge, bool) or not isinstance(edge, int) or edge < 1:
            raise ApiError(400, f"mm_processor_kwargs.size is {_shown(size)}: use {{\"longest_edge\": N}}, N a "
                           "multiple of the model's tile size (e.g. 1024)", "invalid_value", "mm_processor_kwargs.size")
        budget["longest_edge"] = edge
    tiles = value.get("max_tiles")
    if tiles is not None:
        if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
            raise ApiError(400, f"mm_processor_kwargs.max_tiles = {_shown(tiles)}: use a whole number of at least 1",
                           "invalid_value", "mm_processor_kwargs.max_tiles")
        budget["max_tiles"] = tiles
    split = value.get("do_image_splitting")
    if split is not None:
        if not isinstance(split, bool):
            raise ApiError(400, f"mm_processor_kwargs.do_image_splitting = {_shown(split)}: use true or false",
                           "invalid_type", "mm_processor_kwargs.do_image_splitting")
        budget["split"] = split
    return budget


# Leading bytes of video containers (ISO BMFF's ftyp box is checked apart): Matroska/WebM, AVI, FLV, MPEG-PS.
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"FLV\x01", b"\x00\x00\x01\xba")
_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis", b"hevc", b"hevx")


def _base64(payload: str, param: str, kind: str) -> bytes:
    """A data URI's base64 payload (also when a client wrapped it in lines)."""
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{param} is not valid base64: encode the {kind} file's bytes with standard base64",
                           f"invalid_{kind}", param) from None


def _looks_like_video(data: bytes) -> bool:
    """True when ``data`` starts like a video container (MP4/MOV/3GP, Matroska/WebM, AVI, FLV, MPEG-PS)."""
    if data[4:8] == b"ftyp":
        return data[8:12] not in _IMAGE_BRANDS
    return data.startswith(_VIDEO_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")


def _checked_url(url: str, param: str) -> str:
    """An image URL fit to be fetched: no control characters (NUL, CR/LF; a data: URI's base64 may be wrapped
    in lines) and a generic data: type (application/octet-stream) replaced by the image type its bytes show."""
    if url.startswith("data:"):
        if "\x00" in url:
            raise ApiError(400, f"{param} holds a NUL character: send the image's standard base64", "invalid_image_url",
                           param)
        return _typed_data_uri(url, param)
    if _URL_CONTROL.search(url):
        raise ApiError(400, f"{param} holds control characters (NUL, CR, LF, …) or invalid Unicode: send a plain "
                       "URL or path", "invalid_image_url", param)
    return url


def _typed_data_uri(url: str, param: str) -> str:
    comma = url.find(",", 5, 512)
    first = url[5:comma].split(";", 1)[0] if comma > 0 else ""
    if comma < 0 or first.strip().lower() not in _GENERIC_TYPES:
        return url
    head = "".join(url[comma + 1:comma + 65].split())[:16]
    try:
        start = base64.b64decode(head[:len(head) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64: encode the image file's bytes with standard base64",
                       "invalid_image", param) from None
    kind = next((mime for magic, mime in _MAGIC if start.startswith(magic)), None)
    if kind is None and start[:4] == b"RIFF" and start[8:12] == b"WEBP":
        kind = "image/webp"
    if kind is None:
        raise ApiError(400, f"{param} is {first.strip()[:40] or 'untyped'} data whose first bytes are not a PNG, "
                       "JPEG, WebP, GIF, BMP or TIFF image: send an image", "unsupported_image_type", param)
    return "data:" + kind + url[5 + len(first):]


def _clean(text: str) -> str:
    """Text with lone UTF-16 surrogates (JSON allows "\\ud800"; JavaScript clients send them when they cut a
    string inside an emoji) replaced by U+FFFD: the tokenizer and the UTF-8 response cannot carry them."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def _shown(value) -> str:
    """A short, safe rendering of a client's value for an error message (never an echo of the request)."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = repr(value[:40] if isinstance(value, str) else value)
    return text if len(text) <= 48 else text[:45] + "..."


def _message(role: str, parts: list, images: dict[_ImageRef, bytes], videos: dict[_VideoRef, bytes],
             sampling: tuple[float | None, int | None], budget: dict | None = None) -> "Message":
    from rksmolvlm.processing.content import ImagePart, Message, VideoPart
    from rksmolvlm.processing.image import Resolution

    resolution = Resolution(**budget) if budget else None  # None: the server's images.longest_edge/max_tiles

    def typed(p):
        if isinstance(p, _ImageRef):
            return ImagePart(images[p], p.detail, resolution)
        if isinstance(p, _VideoRef):  # its own sampling, else the request's mm_processor_kwargs
            return VideoPart(videos[p], p.fps if p.fps is not None else sampling[0],
                             p.max_frames if p.max_frames is not None else sampling[1])
        return p

    return Message(role, tuple(typed(p) for p in parts))


def _parse_json(body: bytes) -> dict:
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON: send a JSON object", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                       f"{exc.colno}): send a JSON object", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply: a chat request needs a few levels",
                       "invalid_json") from None
    except ValueError:  # an integer of more than 4,300 digits (Python's int conversion limit)
        raise ApiError(400, "the request body holds a number too long to read: send numbers of ordinary size",
                       "invalid_json") from None
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
        raise ApiError(400, f"{name} = {_shown(value)} is out of range: use {bounds}", "invalid_value", name)
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
