"""Requests: the OpenAI chat completion schema → a checked, typed ChatRequest. Every field and limit
(body JSON, parameters, message and text sizes, image and video counts) is checked here, and every
media part is read (``runtime/server/media.py``) and checked (``runtime/server/media_checks.py``)
before the request may queue; a refusal is an ApiError (``runtime/server/errors.py``). The body's
JSON values are counted on its raw bytes before it is parsed (``json_values``): millions of tiny
values in a 21 MB body would take gigabytes as Python objects.

Videos (SmolVLM2 bundles) come as vLLM's ``{"type": "video_url", "video_url": {"url": …}}`` parts,
from the same sources as images (data: URIs, files under images.local_dir, remote URLs when allowed);
their sampling is the part's ``video_url.fps``/``max_frames``, else the request's vLLM-style
``mm_processor_kwargs`` (``fps``, ``num_frames`` or ``max_frames``), else the server's ``[video]``
defaults — a max_frames above the checkpoint's own limit is capped by the runner.

Images' resolution budget: the request's ``mm_processor_kwargs`` may also hold the image processor's
``size`` (``{"longest_edge": N}``, N a multiple of the tile size), ``max_tiles`` (our extension: the
most split tiles per image) and ``do_image_splitting`` (false: one tile per image); absent, the
server's images.longest_edge / images.max_tiles apply. An image's ``detail`` "low" is still one tile.

Structured output (DESIGN §10): ``response_format`` ``json_schema`` / ``json_object`` and a forced tool
call (``tool_choice`` "required" or a named function, with ``tools``) become one ``ResponseFormat``
(``runtime/structured``), compiled here, in the request's thread and before it may queue, by the served
bundle's ``GrammarCompiler``; the grammar goes to the worker in ``GenerationConfig.grammar``. A bad,
unsupported or too costly schema is a 400 with the typed error's ``code`` and ``param``.

The Responses API's part types (``input_text``, ``input_image``) are read here too, so that a later
Responses adapter translates only the envelope."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from rksmolvlm.runtime.server.bulk import bulk
from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.media import IMAGE, VIDEO, MediaKind, MediaRef, MediaSource
from rksmolvlm.runtime.server.media_checks import check_image, check_video, video_decoder_available
from rksmolvlm.runtime.server.model import ServedModel

if TYPE_CHECKING:  # the module is imported for `rksmolvlm --help`: numpy and friends load on use
    from rksmolvlm.processing.content import Message
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.jail.decoder import JailedDecoder
    from rksmolvlm.runtime.structured import GrammarCompiler, ResponseFormat

__all__ = ["ChatRequest", "RequestReader", "json_values", "parse_json"]


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
    format: ResponseFormat | None = None  # the structured answer asked for (None: free text)

    @property
    def tool_call(self) -> bool:
        """The answer is a forced tool call (rendered as tool_calls, not content)."""
        return self.format is not None and self.format.kind == "tool_call"


class RequestReader:
    """Reads a chat completion body: every field checked, every image and video read (MediaSource) and
    checked against the limits (an image's header, a video's container) — all before the request may
    take a queue slot."""

    def __init__(self, config: ServerConfig, model: ServedModel, grammars: GrammarCompiler | None = None,
                 decoder: "JailedDecoder | None" = None):
        self.config = config
        self.limits = config.limits
        self.model = model
        self.media = MediaSource(config)
        self.grammars = grammars  # the served bundle's (None: structured output is refused with a 501)
        self.decoder = decoder  # the server's jail: media are opened in its children (None: in this process)

    def read(self, body: bytes) -> ChatRequest:
        return self.read_payload(parse_json(body, self.limits.max_json_values))

    def read_payload(self, payload: dict, fmt: ResponseFormat | None = None) -> ChatRequest:
        """A chat completion body already parsed from JSON (the Ollama endpoints translate theirs into one
        and pass their ``format`` as ``fmt``, already read)."""
        self._check_model(payload.get("model"))
        self._refuse_unsupported(payload)
        fmt = fmt if fmt is not None else _response_format(payload)
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
        if fmt.constrained:  # compiled before any media is read: a bad schema is refused at once
            config = replace(config, grammar=self.compile(fmt))
        sampling = _mm_processor_kwargs(payload.get("mm_processor_kwargs"))
        budget = _image_budget(payload.get("mm_processor_kwargs"))
        self._check_sizes(payload.get("messages"))
        drafts = self._messages(payload.get("messages"))
        refs = [part for _, parts in drafts for part in parts if isinstance(part, _ImagePart)]
        if len(refs) > self.limits.max_images:
            raise ApiError(400, f"the request has {len(refs)} images, over limits.max_images = "
                           f"{self.limits.max_images}: send at most {self.limits.max_images} per request",
                           "too_many_images", "messages")
        clips = [part for _, parts in drafts for part in parts if isinstance(part, _VideoPart)]
        self._check_video_count(clips)
        # all of the request's media are opened within one decode.probe_timeout_s (in the jail's children)
        deadline = time.monotonic() + self.config.decode.probe_timeout_s
        images = {part: self._read_media(part.ref, deadline) for part in refs}  # parts differ by param
        videos = {part: self._read_media(part.ref, deadline) for part in clips}
        messages = [_message(role, parts, images, videos, sampling, budget) for role, parts in drafts]
        return ChatRequest(messages, config, stream, include_usage, len(refs), sum(map(len, images.values())),
                           len(clips), sum(map(len, videos.values())), fmt if fmt.constrained else None)

    def compile(self, fmt: ResponseFormat):
        """The grammar of ``fmt`` from the bundle's compiler (cached per schema); a schema refused by the
        compiler is a 400 naming its code and param."""
        from rksmolvlm.runtime.structured import StructuredOutputError

        if self.grammars is None:
            raise ApiError(501, f"{fmt.param}: structured output is not available on this server (the grammar "
                           "compiler could not be built for this bundle: see the server log)",
                           "structured_output_unavailable", fmt.param, "server_error")
        try:
            return self.grammars.compile(fmt)
        except StructuredOutputError as exc:
            raise ApiError(400, str(exc), exc.code, exc.param) from None

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
        # tools are ignored and the answer is text unless tool_choice forces a call (_response_format);
        # the legacy function_call cannot force one
        choice = payload.get("function_call")
        if choice not in (None, "none", "auto"):
            raise ApiError(400, f"function_call = {_shown(choice)} demands a call through the legacy functions API: "
                           "send the function in tools and name it in tool_choice ({\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}), or set function_call to \"auto\" or \"none\"",
                           "unsupported_value", "function_call")
        if payload.get("logprobs"):
            raise ApiError(400, "logprobs are not supported: leave logprobs out (token ids are in the response's "
                           "'rksmolvlm' field)", "unsupported_parameter", "logprobs")
        if payload.get("logit_bias"):
            raise ApiError(400, "logit_bias is not supported: leave it out", "unsupported_parameter", "logit_bias")

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
        """(role, parts) per message, checked; a part is a TextPart, or an _ImagePart or _VideoPart still to read.

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
        """A message's content (a string, or an array of text, image and video parts) as TextParts, _ImageParts
        and _VideoParts."""
        from rksmolvlm.processing.content import TextPart

        if content is None or isinstance(content, str):
            return [TextPart(_clean(content or ""))]
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or an array of parts", "invalid_type",
                           f"{where}.content")
        parts: list = []
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
                parts.append(_ImagePart(MediaRef.parse(IMAGE, url, f"{param}.image_url"), detail or "auto"))
            elif kind == "video_url":  # vLLM's video part: {"video_url": {"url": …, "fps"?, "max_frames"?}}
                ref = part.get("video_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{param}.video_url must be {{\"url\": \"data:video/mp4;base64,…\"}}",
                                   "invalid_type", f"{param}.video_url")
                own = ref if isinstance(ref, dict) else {}
                parts.append(_VideoPart(MediaRef.parse(VIDEO, url, f"{param}.video_url"),
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

    # -- media: read and checked, images first ---------------------------------------------------
    def _read_media(self, ref: MediaRef, deadline: float) -> bytes:
        data = self.media.read(ref)
        _CHECKS[ref.kind](data, ref.param, self.config, self.decoder, deadline=deadline)
        return data

    # -- videos ----------------------------------------------------------------------------------
    def _check_video_count(self, clips: list[_VideoPart]) -> None:
        """Videos are wanted: the model takes them, the server allows them, not too many — refused
        before any video is fetched."""
        if not clips:
            return
        param = clips[0].ref.param
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


def _response_format(payload: dict) -> ResponseFormat:
    """The answer's format: response_format, or a call forced by tool_choice (not both)."""
    from rksmolvlm.runtime.structured import (StructuredOutputError, from_openai_response_format,
                                              from_tool_choice)

    try:
        fmt = from_openai_response_format(payload.get("response_format"))
        call = from_tool_choice(payload.get("tool_choice"), payload.get("tools"))
    except StructuredOutputError as exc:
        raise ApiError(400, str(exc), exc.code, exc.param) from None
    if fmt.constrained and call.constrained:
        raise ApiError(400, "tool_choice forces a tool call and response_format asks for JSON content: the answer can "
                       "be only one of them; leave response_format out or set tool_choice to \"auto\"",
                       "invalid_value", "response_format")
    return call if call.constrained else fmt


def parse_json(body: bytes, max_values: int) -> dict:
    """A request body as a JSON object, or the error naming what is wrong with it: a 413 when it holds
    more than ``max_values`` JSON values (limits.max_json_values), counted on the raw bytes before
    any Python object is built (``json_values``), else the 400 of invalid JSON."""
    with bulk(len(body)):  # one multi-megabyte parse at a time (runtime/server/bulk.py)
        values = json_values(body, max_values)
        payload = None if values > max_values else _loads(body)
    if values > max_values:
        raise ApiError(413, f"the request body holds at least {values:,} JSON values (strings, keys, numbers, arrays "
                       f"and objects), over limits.max_json_values = {max_values:,}: send fewer messages, parts or "
                       "images (each image is one base64 string), or raise limits.max_json_values in the server "
                       "config", "too_many_json_values")
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object with model and messages", "invalid_json")
    return payload


def _loads(body: bytes):
    """``json.loads``, its failures as the 400 invalid_json naming what is wrong."""
    try:
        return json.loads(body)
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


def json_values(body: bytes, limit: int) -> int:
    """How many JSON values ``body`` holds (strings, keys too, and every value after a ``[``, ``{`` or
    ``,`` outside strings), counted at C speed without parsing: at most ``limit`` means within it (an
    upper bound), above it a lower bound. Each pass runs only when the one before cannot decide: the
    ``"``, ``,``, ``[`` and ``{`` anywhere (an upper bound; a legitimate body stops here: base64 has none
    of them), the strings alone (a lower bound; a bomb of millions of tiny strings stops here), then the
    structure between the strings (a split into at most 2 × ``limit`` + 1 pieces)."""
    upper = len(body.translate(None, _NOT_STRUCTURAL))
    if upper <= limit:
        return upper
    # escaped backslashes, then escaped quotes, out: every '"' left opens or closes a string
    plain = body if b"\\" not in body else body.replace(b"\\\\", b"").replace(b'\\"', b"")
    strings = plain.count(b'"') // 2
    if strings > limit:
        return strings
    outside = b"".join(plain.split(b'"')[0::2])  # the even pieces lie between strings
    return strings + len(outside.translate(None, _NOT_STRUCTURAL))


# ==============================================================================================
# Private helpers
# ==============================================================================================
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TOOL_ROLES = ("tool", "function")  # a tool's result (legacy: function), rendered as user text
_MAX_STOPS = 4
_MAX_STOP_CHARS = 64  # the text stream holds back any prefix of a stop string: keep them short
_MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'",[{')  # deleted: what is left is counted
_MM_KWARGS = ("fps", "num_frames", "max_frames")  # what mm_processor_kwargs may hold (vLLM's names and ours)
_MM_IMAGE_KWARGS = ("size", "max_tiles", "do_image_splitting")  # and for images: see the module docstring
_MAX_FPS = 1000.0  # rksmolvlm.processing.content.VideoPart's bound
_DETAILS = ("auto", "low", "high")  # rksmolvlm.processing.content.DETAILS, without importing Pillow here
# A media kind → its pre-queue check (runtime/server/media_checks.py).
_CHECKS: dict[MediaKind, Callable[..., None]] = {IMAGE: check_image, VIDEO: check_video}


@dataclass(frozen=True)
class _ImagePart:
    """An image part as the request names it, before it is read and checked."""

    ref: MediaRef
    detail: str = "auto"


@dataclass(frozen=True)
class _VideoPart:
    """A video part as the request names it, before it is read and checked: its own sampling, if any."""

    ref: MediaRef
    fps: float | None = None
    max_frames: int | None = None


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


def _message(role: str, parts: list, images: dict[_ImagePart, bytes], videos: dict[_VideoPart, bytes],
             sampling: tuple[float | None, int | None], budget: dict | None = None) -> "Message":
    from rksmolvlm.processing.content import ImagePart, Message, VideoPart
    from rksmolvlm.processing.image import Resolution

    resolution = Resolution(**budget) if budget else None  # None: the server's images.longest_edge/max_tiles

    def typed(p):
        if isinstance(p, _ImagePart):
            return ImagePart(images[p], p.detail, resolution)
        if isinstance(p, _VideoPart):  # its own sampling, else the request's mm_processor_kwargs
            return VideoPart(videos[p], p.fps if p.fps is not None else sampling[0],
                             p.max_frames if p.max_frames is not None else sampling[1])
        return p

    return Message(role, tuple(typed(p) for p in parts))


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
