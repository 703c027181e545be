"""The Ollama API beside the OpenAI one, for clients that speak only Ollama (Home Assistant's and
Frigate's Ollama integrations, Open WebUI's Ollama connection, the official ``ollama`` clients).

``GET /api/version``, ``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``POST /api/chat``,
``POST /api/generate``. A chat or generate body is translated into a chat completion body and read
by the same RequestReader (body size, JSON, parameters, image type, bytes and pixels), queued on the
same ModelService and answered as NDJSON (``stream`` defaults to true, as in Ollama) or as one JSON
object. Errors are Ollama's ``{"error": "message"}`` with the HTTP status (the ollama clients raise
them as ResponseError), their messages naming the Ollama fields (``options.num_predict``,
``messages[0].images[1]``, ``images[0]``).

Decisions: options the request leaves out take the server's defaults (greedy), not Ollama's;
``num_ctx`` and ``keep_alive`` are ignored (the bundle fixes the context, the model stays loaded);
unknown options are ignored; ``format`` ("json": any JSON object, or a JSON schema) is read by
``runtime/structured`` and compiled into the request's grammar like the OpenAI side's response_format
(a refused schema is a 400 naming ``format``); ``think`` (other than false), ``raw``, ``template``,
``suffix`` and ``context`` are refused with a 400 (SmolVLM has no thinking, and always answers
through the bundle's chat template); ``tools`` leave the answer text (Ollama has no way to force a
call); an empty chat or prompt answers at once (Ollama's "load the model" request). ``/api/version``
needs no API key, like ``/health``. ``/api/show``'s capabilities are Ollama's ("completion", "vision")
plus "structured_outputs": Ollama lists no capability for ``format`` (its every model takes it).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from rksmolvlm import __version__
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.exchange import ClientGone, Gateway, read_body
from rksmolvlm.runtime.server.requests import ChatRequest, parse_json

if TYPE_CHECKING:
    from rksmolvlm.runtime.server.service import Answer
    from rksmolvlm.runtime.structured import ResponseFormat

__all__ = ["ollama_routes", "OllamaApi", "OLLAMA_API_VERSION", "translate_chat", "translate_generate",
           "Translation"]

# The Ollama release whose API these endpoints follow (images, done_reason, /api/ps, format): what
# /api/version reports, so that clients gating features on it see a server of that level.
OLLAMA_API_VERSION = "0.5.0"
PATHS = ("/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate")


# ==============================================================================================
# Routes
# ==============================================================================================
def ollama_routes(gateway: Gateway) -> list:
    """The Starlette routes of the Ollama API over the Gateway the OpenAI adapter shares (its service,
    reader, key and metrics); any other ``/api/…`` path gets an Ollama-style 404 (or 405)."""
    from starlette.routing import Route

    ollama = OllamaApi(gateway)
    return [
        Route("/api/version", ollama.endpoint(ollama.version), methods=["GET"]),
        Route("/api/tags", ollama.endpoint(ollama.tags), methods=["GET"]),
        Route("/api/show", ollama.endpoint(ollama.show), methods=["POST"]),
        Route("/api/ps", ollama.endpoint(ollama.ps), methods=["GET"]),
        Route("/api/chat", ollama.endpoint(ollama.chat), methods=["POST"]),
        Route("/api/generate", ollama.endpoint(ollama.generate), methods=["POST"]),
        Route("/api/{rest:path}", ollama.endpoint(ollama.unknown),
              methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    ]


# ==============================================================================================
# Translation: an Ollama body → a chat completion body for the RequestReader
# ==============================================================================================
@dataclass
class Translation:
    """An Ollama request as the OpenAI side reads it, with what only Ollama has beside it."""

    payload: dict  # a chat completion body: RequestReader.read_payload reads it
    model: str  # the name to answer with (Ollama echoes the request's)
    load: bool = False  # no messages / no prompt: Ollama's "load the model" request, answered at once
    repeat_penalty: float | None = None
    format: ResponseFormat | None = None  # Ollama's format, read (None: free text)
    renames: list[tuple[re.Pattern, str]] = field(default_factory=list)  # OpenAI param → Ollama field

    def rename(self, error: ApiError) -> ApiError:
        """``error`` with its message naming the Ollama fields instead of the chat completion ones."""
        message, param = error.message, error.param
        for pattern, repl in [*self.renames, *_option_renames(param)]:
            message = pattern.sub(repl, message)
            param = pattern.sub(repl, param) if param else param
        return ApiError(error.status, message, error.code, param, error.type, error.headers)


def translate_chat(payload: dict, model: str) -> Translation:
    """``POST /api/chat``: messages (``images`` as base64 beside ``content``), options, stream, tools."""
    _refuse_unsupported(payload, model, generate=False)
    messages = payload.get("messages")
    if messages is None or messages == []:
        return Translation({}, model, load=True)
    if not isinstance(messages, list):
        raise ApiError(400, "messages must be an array of {\"role\", \"content\", \"images\"} objects",
                       "invalid_type", "messages")
    out, call_ids = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", "invalid_type", where)
        content = _text(message.get("content"), f"{where}.content",
                        f"(images go in {where}.images as base64 strings)")
        images = _images(message.get("images"), f"{where}.images")
        entry: dict = {"role": message.get("role")}
        entry["content"] = [*images, *_text_part(content)] if images else content
        calls = message.get("tool_calls")
        if calls:
            entry["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls", i)
            call_ids = [call["id"] for call in entry["tool_calls"]]
        if entry["role"] == "tool" and call_ids:
            entry["tool_call_id"] = call_ids.pop(0)
        out.append(entry)
    body = {"messages": out, **_common(payload)}
    if payload.get("tools"):  # the ollama client sends [] with every chat
        body["tools"] = payload["tools"]  # Ollama's tools have OpenAI's shape: the OpenAI side's policy applies
    renames = [(re.compile(r"messages\[(\d+)\]\.content\[(\d+)\]\.image_url"), r"messages[\1].images[\2]"),
               (re.compile(r"messages\[(\d+)\]\.content\[\d+\]\.text"), r"messages[\1].content")]
    return Translation(body, model, repeat_penalty=_repeat_penalty(payload), format=_format(payload),
                       renames=renames)


def translate_generate(payload: dict, model: str) -> Translation:
    """``POST /api/generate``: prompt, system and top-level ``images``, options, stream."""
    _refuse_unsupported(payload, model, generate=True)
    prompt = _text(payload.get("prompt"), "prompt")
    system = _text(payload.get("system"), "system")
    images = _images(payload.get("images"), "images")
    if not prompt and not images:
        return Translation({}, model, load=True)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    user = len(messages)
    if images:
        messages.append({"role": "user", "content": [*images, *_text_part(prompt)]})
    else:
        messages.append({"role": "user", "content": prompt})
    renames = [(re.compile(rf"messages\[{user}\]\.content\[(\d+)\]\.image_url"), r"images[\1]"),
               (re.compile(rf"messages\[{user}\]\.content(\[\d+\]\.text)?"), "prompt"),
               (re.compile(r"messages\[0\]\.content"), "system")]
    return Translation({"messages": messages, **_common(payload)}, model, repeat_penalty=_repeat_penalty(payload),
                       format=_format(payload), renames=renames)


# ==============================================================================================
# Endpoints
# ==============================================================================================
class OllamaApi:
    """The Ollama endpoints, over the Gateway (service, reader, API key, metrics) the OpenAI side shares."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.service = gateway.service
        self.model = gateway.model
        self.config = gateway.config
        base = self.model.id
        self.tag = base if ":" in base.rsplit("/", 1)[-1] else f"{base}:latest"
        self._facts: dict | None = None

    def endpoint(self, handler: Callable):
        """``handler`` with every ApiError answered Ollama's way."""
        async def run(request):
            try:
                return await handler(request)
            except ApiError as error:
                return self.error_response(request, error)

        return run

    def error_response(self, request, error: ApiError):
        from starlette.responses import JSONResponse

        self.gateway.count_error(request.scope, error)
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    # -- model names and facts -----------------------------------------------------------------
    def knows(self, name: str) -> bool:
        """Is ``name`` the served model (its id or an alias, with or without ``:latest``)? Any name is,
        unless ``server.strict_model_name`` is set."""
        if not getattr(self.config.server, "strict_model_name", True):
            return True
        names = {n.lower() for n in self.model.names}
        name = name.lower()
        return name in names or name.removesuffix(":latest") in names or f"{name}:latest" in names

    def model_name(self, payload: dict, key: str = "model") -> str:
        name = payload.get(key)
        if name is None:
            return self.tag  # one model: curl users may leave it out
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"{key} must be a model name such as {self.tag!r}", "invalid_type", key)
        if not self.knows(name):
            raise ApiError(404, f"model {name[:200]!r} not found: this server serves {self.tag!r} (GET /api/tags "
                           "lists it)", "model_not_found", key)
        return name

    def facts(self, request) -> dict:
        """Size, digest and details of the served bundle, computed once."""
        if self._facts is None:
            details = self.model.details
            bundle = getattr(request.app.state, "bundle", None)
            size, digest = 0, hashlib.sha256(self.model.id.encode()).hexdigest()
            if bundle is not None:
                from rksmolvlm.bundle.manifest import MANIFEST

                size = bundle.manifest.size_bytes
                digest = hashlib.sha256(bundle.path.joinpath(MANIFEST).read_bytes()).hexdigest()
            family = details.get("family") or "smolvlm"
            self._facts = {
                "size": size, "digest": digest,
                "modified_at": _timestamp(self.model.created),
                "details": {"parent_model": "", "format": "rksmolvlm", "family": family, "families": [family],
                            "parameter_size": details.get("size") or "", "quantization_level":
                            details.get("llm_dtype") or ""},
            }
        return self._facts

    # -- metadata --------------------------------------------------------------------------------
    async def version(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"version": OLLAMA_API_VERSION, "rksmolvlm": __version__})

    async def tags(self, request):
        from starlette.responses import JSONResponse

        self.gateway.authorize(request)
        facts = self.facts(request)
        return JSONResponse({"models": [{"name": self.tag, "model": self.tag, "modified_at": facts["modified_at"],
                                         "size": facts["size"], "digest": facts["digest"],
                                         "details": facts["details"]}]})

    async def show(self, request):
        from starlette.responses import JSONResponse

        self.gateway.authorize(request)
        payload = await self._payload(request)
        self.model_name(payload, "model" if "model" in payload else "name")
        facts, context = self.facts(request), self.model.max_context
        family = facts["details"]["family"]
        return JSONResponse({
            "license": "",
            "modelfile": f"# served by rksmolvlm {__version__}\nFROM {self.tag}\nPARAMETER num_ctx {context}\n",
            "parameters": f"num_ctx {context}",
            "template": "",
            "details": facts["details"],
            "model_info": {"general.architecture": family, "general.basename": self.model.id,
                           "general.size_label": facts["details"]["parameter_size"],
                           f"{family}.context_length": context},
            "capabilities": ["completion", "vision",
                             *(["structured_outputs"] if self.gateway.grammars is not None else [])],
            "modified_at": facts["modified_at"],
        })

    async def ps(self, request):
        from starlette.responses import JSONResponse

        self.gateway.authorize(request)
        if self.service.state != "ready":
            return JSONResponse({"models": []})
        facts = self.facts(request)
        return JSONResponse({"models": [{
            "name": self.tag, "model": self.tag, "size": facts["size"], "digest": facts["digest"],
            "details": facts["details"], "expires_at": _NEVER, "size_vram": 0,
            "context_length": self.model.max_context}]})

    async def unknown(self, request):
        path = request.url.path
        if path in PATHS:
            allowed = "POST" if path in ("/api/show", "/api/chat", "/api/generate") else "GET"
            raise ApiError(405, f"{request.method} is not allowed on {path}: use {allowed}", "method_not_allowed",
                           headers={"Allow": allowed})
        raise ApiError(404, f"no endpoint at {path[:200]}: this server (rksmolvlm) answers "
                       f"{', '.join(PATHS)} of the Ollama API; models cannot be pulled, created, copied or deleted "
                       "here", "not_found")

    # -- generation ------------------------------------------------------------------------------
    async def chat(self, request):
        return await self._generate(request, translate_chat,
                                    lambda text: {"message": {"role": "assistant", "content": text}})

    async def generate(self, request):
        return await self._generate(request, translate_generate, lambda text: {"response": text})

    async def _generate(self, request, translate: Callable[[dict, str], Translation],
                        content: Callable[[str], dict]):
        from starlette.responses import JSONResponse, Response

        started = time.monotonic_ns()
        gateway = self.gateway
        # Ollama bodies carry no video: limits.max_body_bytes as configured
        admitted = await gateway.admit(request, lambda body: self._read(body, translate),
                                       self.config.limits.max_body_bytes)
        if admitted is None:
            return Response(status_code=499)
        translation, chat = admitted
        head = {"model": translation.model, "created_at": _now()}
        if chat is None:  # Ollama's "load the model": it is loaded
            return JSONResponse({**head, **content(""), "done": True, "done_reason": "load"})
        exchange = gateway.enqueue(request, chat)
        if chat.stream:  # as on the OpenAI side, the first line goes out now: queue wait and prefill do not eat
            # the client's first-byte timeout; what fails after this point is an {"error"} line
            return gateway.stream(request, exchange, _LineFrames(translation, content, started),
                                  {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                                   "X-Accel-Buffering": "no"})
        try:
            answer = await gateway.complete(request, exchange)
        except ApiError as exc:
            raise translation.rename(exc) from None
        if answer is None:
            return Response(status_code=499)
        head["created_at"] = _now()
        return JSONResponse({**head, **content(answer.text), **_final(answer, started)})

    def _read(self, body: bytes,
              translate: Callable[[dict, str], Translation]) -> tuple[Translation, ChatRequest | None]:
        """The body → (translation, checked request), or no request for a "load the model" call; runs
        in a worker thread (base64 and image headers are read here)."""
        limits = self.config.limits
        payload = parse_json(body, limits.max_json_values)
        # counted on the parsed lists, before any becomes a part
        _check_image_count(payload, limits.max_images, chat=translate is translate_chat)
        translation = translate(payload, self.model_name(payload))
        if translation.load:
            return translation, None
        try:
            chat = self.gateway.reader.read_payload(translation.payload, translation.format)
        except ApiError as error:
            raise translation.rename(error) from None
        if translation.repeat_penalty is not None:
            chat.config = dataclasses.replace(chat.config, repeat_penalty=translation.repeat_penalty)
        return translation, chat

    async def _payload(self, request) -> dict:
        try:
            body = await read_body(request, self.config.limits.max_body_bytes)
        except ClientGone:
            raise ApiError(400, "the client closed the connection", "client_gone") from None
        return parse_json(body, self.config.limits.max_json_values)


# ==============================================================================================
# Private helpers
# ==============================================================================================
class _LineFrames:
    """The NDJSON stream: an empty first line at once, then one line per text delta, then the closing
    line with the counts (or an {"error"} line, its message naming the Ollama fields)."""

    def __init__(self, translation: Translation, content: Callable[[str], dict], started: int):
        self.translation = translation
        self.content = content
        self.started = started

    def opening(self) -> bytes:
        return _line({**self._head(), **self.content(""), "done": False})

    def delta(self, text: str) -> bytes:
        return _line({**self._head(), **self.content(text), "done": False})

    def done(self, answer: Answer) -> Iterable[bytes]:
        yield _line({**self._head(), **self.content(""), **_final(answer, self.started)})

    def error(self, error: ApiError) -> Iterable[bytes]:
        yield _line({"error": self.translation.rename(error).message})

    def _head(self) -> dict:
        return {"model": self.translation.model, "created_at": _now()}


_NEVER = "9999-12-31T23:59:59Z"  # /api/ps: the model stays loaded while the server runs
_DATA_URI = "data:image/png;base64,"  # nominal type: the reader identifies the image from its header
_OPTIONS = ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty")
_MAX_TOKENS = re.compile(r"(?<![\w.])(max_completion_tokens|max_tokens)\b")


def _option_renames(param: str | None) -> list[tuple[re.Pattern, str]]:
    renames = [(_MAX_TOKENS, "options.num_predict")]
    if param in _OPTIONS:
        renames.append((re.compile(rf"(?<![\w.]){param}\b"), f"options.{param}"))
    return renames


def _format(payload: dict) -> ResponseFormat | None:
    """Ollama's ``format`` ("json" or a schema) as a ResponseFormat; None for free text."""
    from rksmolvlm.runtime.structured import StructuredOutputError, from_ollama_format

    try:
        fmt = from_ollama_format(payload.get("format"))
    except StructuredOutputError as exc:
        raise ApiError(400, str(exc), exc.code, exc.param) from None
    return fmt if fmt.constrained else None


def _refuse_unsupported(payload: dict, model: str, generate: bool) -> None:
    if payload.get("think") not in (None, False):
        raise ApiError(400, f"{json.dumps(model)} does not support thinking: leave think out or false",
                       "unsupported_parameter", "think")
    if not generate:
        return
    if payload.get("raw") not in (None, False):
        raise ApiError(400, "raw is not supported: the prompt always goes through the bundle's chat template; send "
                       "the text as prompt without raw", "unsupported_parameter", "raw")
    for name, why in (("template", "the bundle's chat template is always used"),
                      ("suffix", "SmolVLM does not fill in the middle"),
                      ("context", "send the conversation to /api/chat as messages")):
        if payload.get(name) not in (None, "", []):
            raise ApiError(400, f"{name} is not supported: {why}; leave {name} out", "unsupported_parameter", name)


def _common(payload: dict) -> dict:
    """The chat completion fields of an Ollama body: stream (true by default) and the options."""
    stream = payload.get("stream")
    body: dict = {"stream": True if stream is None else stream}
    if payload.get("logprobs") is not None:
        body["logprobs"] = payload["logprobs"]
    options = payload.get("options")
    if options is None:
        return body
    if not isinstance(options, dict):
        raise ApiError(400, "options must be an object such as {\"temperature\": 0, \"num_predict\": 100}",
                       "invalid_type", "options")
    body.update({name: options[name] for name in _OPTIONS if options.get(name) is not None})
    predict = options.get("num_predict")
    negative = isinstance(predict, (int, float)) and not isinstance(predict, bool) and predict < 0
    if predict is not None and not negative:  # -1 (no limit) and -2 (fill the context): the server's default
        body["max_tokens"] = predict
    return body


def _repeat_penalty(payload: dict) -> float | None:
    options = payload.get("options")
    value = options.get("repeat_penalty") if isinstance(options, dict) else None
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, "options.repeat_penalty must be a number (1 = off)", "invalid_type",
                       "options.repeat_penalty")
    if not 0 < value <= 2:
        raise ApiError(400, f"options.repeat_penalty = {value} is out of range: use a number above 0 and at most 2 "
                       "(1 = off)", "invalid_value", "options.repeat_penalty")
    return float(value)


def _text(value, param: str, hint: str = "") -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string {hint}".rstrip(), "invalid_type", param)
    return value


def _text_part(text: str) -> list[dict]:
    """The text after a message's images (none when empty, as a client sending only images would)."""
    return [{"type": "text", "text": text}] if text else []


def _images(value, param: str) -> list[dict]:
    """Ollama's base64 ``images`` as chat completion image parts (data: URIs, read by the reader)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{param} must be an array of base64-encoded image files", "invalid_type", param)
    return [{"type": "image_url", "image_url": {"url": v if v.startswith("data:") else _DATA_URI + v}} for v in value]


def _check_image_count(payload: dict, limit: int, chat: bool) -> None:
    """Ollama's ``images`` (every message's for /api/chat, the top-level ones for /api/generate) counted
    before any becomes a part: the 400 naming limits.max_images the reader would give after translating."""
    messages = payload.get("messages") if chat else None
    lists = [] if chat else [("images", payload.get("images"))]
    if isinstance(messages, list):
        lists = [(f"messages[{i}].images", m.get("images")) for i, m in enumerate(messages) if isinstance(m, dict)]
    counted = [(param, len(value)) for param, value in lists if isinstance(value, list)]
    total = sum(n for _, n in counted)
    if total > limit:
        where = max(counted, key=lambda item: item[1])[0]
        raise ApiError(400, f"the request has {total:,} images, over limits.max_images = {limit}: send at most "
                       f"{limit} per request", "too_many_images", where)


def _tool_calls(calls, param: str, index: int) -> list[dict]:
    """Ollama's ``tool_calls`` (arguments as an object) in OpenAI's shape (arguments as JSON text)."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{param} must be an array of {{\"function\": {{\"name\", \"arguments\"}}}}",
                       "invalid_type", param)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"{param}[{j}] must be {{\"function\": {{\"name\", \"arguments\"}}}}", "invalid_type",
                           f"{param}[{j}]")
        arguments = function.get("arguments", {})
        out.append({"id": f"call_{index}_{j}", "type": "function",
                    "function": {"name": function["name"],
                                 "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return out


def _final(answer: "Answer", started: int) -> dict:
    """The closing fields of an answer: Ollama's counts and durations (nanoseconds)."""
    stats = answer.stats
    return {"done": True, "done_reason": answer.finish_reason,
            "total_duration": time.monotonic_ns() - started, "load_duration": 0,
            "prompt_eval_count": answer.prompt_tokens,
            "prompt_eval_duration": round((stats.vision_ms + stats.prefill_ms) * 1e6),
            "eval_count": len(answer.token_ids), "eval_duration": round(stats.generate_ms * 1e6),
            "rksmolvlm": answer.extra()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _timestamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _line(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
