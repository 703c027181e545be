"""HTTP: the Starlette application and its endpoints.

``POST /v1/chat/completions`` (``stream: true`` → server-sent events), ``GET /v1/models``,
``GET /health`` (200 once the bundle is loaded, 503 while loading, failed or stuck),
``GET /health/live``, ``GET /metrics`` (Prometheus text), and the Ollama API under ``/api``
(runtime/server/ollama.py). A client that goes away, or a request over its time limit, aborts its
generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator, Callable

from rksmolvlm import __version__
from rksmolvlm.runtime.server.config import VIDEO_LIMIT_KEYS, ServerConfig
from rksmolvlm.runtime.server.cors import Cors
from rksmolvlm.runtime.server.guards import RequestGuard
from rksmolvlm.runtime.server.metrics import _rss_bytes
from rksmolvlm.runtime.server.notify import SystemdNotifier
from rksmolvlm.runtime.server.requests import ApiError, ChatRequest, RequestReader, video_decoder_available
from rksmolvlm.runtime.server.service import Answer, Job, ModelService
from rksmolvlm.runtime.server.web import WebPage, page_enabled, prefers_html

__all__ = ["create_app"]

log = logging.getLogger("rksmolvlm.server")


# ==============================================================================================
# HTTP
# ==============================================================================================
def create_app(service: ModelService, config: ServerConfig, *, api_key: str | None = None,
               notifier: SystemdNotifier | None = None, on_fatal: Callable[[], None] | None = None):
    """The Starlette application; its lifespan starts the service (loading the model) and stops it."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    from rksmolvlm.runtime.server.ollama import ollama_routes

    api = _Api(service, config, api_key, notifier or SystemdNotifier(None), on_fatal)
    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", api.retrieve_model, methods=["GET"]),
        Route("/props", api.props, methods=["GET"]),  # llama.cpp's server properties (Frigate reads them)
        Route("/health", api.health, methods=["GET"]),
        Route("/health/ready", api.health, methods=["GET"]),
        Route("/health/live", api.live, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/", api.index, methods=["GET"]),
        *ollama_routes(api),  # /api/*: the Ollama API (runtime/server/ollama.py)
    ]
    app = Starlette(routes=routes, lifespan=api.lifespan,
                    exception_handlers={ApiError: api.on_api_error, HTTPException: api.on_http_error})
    # Host, Origin and Content-Type checks (runtime/server/guards.py), inside CORS: its refusals carry CORS headers
    app.add_middleware(RequestGuard, config=config, api_key=api_key, on_refuse=api.note_refused)
    if config.server.cors_origins:  # inside the request log: preflights are logged and counted too
        app.add_middleware(Cors, origins=config.server.cors_origins)
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
        self.body_limit = config.body_limit(self._takes_video())  # a video's data: URI must get through
        self.api_key = api_key
        self.notifier = notifier
        self.on_fatal = on_fatal
        self.started = time.time()
        # server.web_ui: the page at GET / for browsers (runtime/server/web/); None: the JSON index only
        self.web_page = WebPage.load() if page_enabled(config, api_key is not None) else None

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

    def note_refused(self, scope, error: ApiError) -> None:
        """A request refused before routing (runtime/server/guards.py): counted and logged like the rest."""
        self.metrics.inc("rksmolvlm_errors_total", code=error.code)
        _note(scope, error=error.code)

    async def on_api_error(self, request, exc: ApiError):
        return self.error_response(request, exc)

    async def on_http_error(self, request, exc):
        if exc.status_code == 404:
            error = ApiError(404, f"no endpoint at {request.url.path}: use /v1/chat/completions, /v1/models, "
                             "/health, /metrics or the Ollama API under /api", "not_found")
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

    async def admit(self, request, read: Callable[[bytes], object], limit: int | None = None):
        """The common entry of the generating endpoints: the key, a ready model, the body within
        its limit (``body_limit`` unless given), then ``read(body)`` off the event loop. None when
        the client left meanwhile."""
        self.authorize(request)
        if self.service.state != "ready":
            raise self.service.unavailable()
        try:
            body = await _read_body(request, limit or self.body_limit, self.config.limits.max_body_bytes)
        except _ClientGone:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, read, body)

    def enqueue(self, request, chat: ChatRequest) -> "_Exchange":
        """Note what the request holds, queue its job, and watch its client and deadline."""
        _note(request.scope, images=chat.images, image_bytes=chat.image_bytes, stream=chat.stream,
              max_tokens=chat.config.max_new_tokens)
        if chat.videos:
            _note(request.scope, videos=chat.videos, video_bytes=chat.video_bytes)
        job = self.service.submit(chat, asyncio.get_running_loop(), request.scope["state"]["request_id"])
        return _Exchange(job, self.service, request.receive, self.config.server.request_timeout_s)

    # -- endpoints -----------------------------------------------------------------------------
    async def chat_completions(self, request):
        from starlette.responses import JSONResponse, Response

        request_id = request.scope["state"]["request_id"]
        chat = await self.admit(request, self.reader.read)
        if chat is None:
            return Response(status_code=499)
        exchange = self.enqueue(request, chat)
        if chat.stream:  # the role chunk goes out now: queue wait and prefill do not eat the client's first-byte
            # timeout; what fails after this point (context, image, 504, 503) is an error event in the stream
            return _EventStream(self._sse(request, exchange, None, chat), on_close=exchange.close,
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = await exchange.answer()
            self._note_answer(request, answer)
            return JSONResponse(self._completion(answer, request_id))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            exchange.close()

    async def _sse(self, request, exchange: "_Exchange", first, chat: ChatRequest) -> AsyncIterator[bytes]:
        """The stream: the role chunk at once, then the job's events (``first``, if given, then the rest)."""
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
            event = first if first is not None else await exchange.next()
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
                    if value.code == "shutting_down":  # the server stops: the stream still ends as streams do
                        yield b"data: [DONE]\n\n"
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

    def _input_modalities(self) -> list[str]:
        vision = self.model.details.get("vision_dtype") is not None
        images = ["image"] if vision and self.config.limits.max_images > 0 else []
        return ["text", *images, *(["video"] if vision and self._takes_video() else [])]

    def _takes_video(self) -> bool:
        return self.model.video is not None and self.config.video.enabled and video_decoder_available()

    def _media_limits(self) -> dict:
        """What a client may send besides text: the image limits and, for a model that takes video, the
        video sampling defaults (the request's own fps/max_frames win; max_frames at most the checkpoint's)
        and limits."""
        limits, video = self.config.limits, self.config.video
        images = {"max_images": limits.max_images, "max_image_bytes": limits.max_image_bytes,
                  "max_image_pixels": limits.max_image_pixels, "max_body_bytes": limits.max_body_bytes}
        if not self._takes_video():
            return {"images": images, "video": None}
        checkpoint = self.model.video
        return {"images": images, "video": {
            "fps": video.fps if video.fps is not None else checkpoint["fps"],
            "max_frames": min(video.max_frames, checkpoint["max_frames"]),
            "checkpoint_max_frames": checkpoint["max_frames"], "max_videos": video.max_videos,
            **{name: getattr(video, name) for name in VIDEO_LIMIT_KEYS}}}

    def _model_card(self) -> dict:
        """OpenAI's model object plus what clients look for: the context (vLLM's max_model_len,
        context_length, llama.cpp's meta.n_ctx) and the input modalities (top level and OpenRouter's /
        llama.cpp's architecture object)."""
        context, inputs = self.model.max_context, self._input_modalities()
        return {"id": self.model.id, "object": "model", "created": self.model.created, "owned_by": "rksmolvlm",
                "max_model_len": context, "context_length": context, "input_modalities": inputs,
                "output_modalities": ["text"],
                "architecture": {"input_modalities": inputs, "output_modalities": ["text"]},
                "meta": {"n_ctx": context}, "aliases": list(self.model.aliases),
                "rksmolvlm": {**self.model.details, "aliases": list(self.model.aliases), **self._media_limits()}}

    async def models(self, request):
        from starlette.responses import JSONResponse

        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request):
        from starlette.responses import JSONResponse

        self.authorize(request)
        if self.config.server.strict_model_name and request.path_params["model_id"] not in self.model.names:
            raise ApiError(404, f"the model {request.path_params['model_id'][:64]!r} is not served here: use "
                           f"{self.model.id!r}", "model_not_found", "model")
        return JSONResponse(self._model_card())  # a one-model server answers any name with its model

    async def props(self, request):
        """What llama.cpp's server reports at GET /props, in its field names: the context, one slot,
        the modalities and the defaults a request gets."""
        from starlette.responses import JSONResponse

        self.authorize(request)
        limits, context = self.config.limits, self.model.max_context
        # llama.cpp's n_predict -1: until the context ends
        n_predict = limits.default_max_tokens or (limits.max_tokens if limits.max_tokens < context else -1)
        params = {"n_predict": n_predict, "max_tokens": n_predict, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                  "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop": []}
        return JSONResponse({
            "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": context, "speculative": False,
                                            "is_processing": bool(self.service.snapshot()["running"]),
                                            "params": params},
            "total_slots": 1, "model_path": self.model.id, "model_alias": self.model.id, "chat_template": "",
            "chat_template_caps": {"supports_tools": False, "supports_tool_calls": False},
            "modalities": {"vision": "image" in self._input_modalities(), "audio": False},
            "build_info": _FINGERPRINT, "is_sleeping": False})

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
        from starlette.responses import JSONResponse, Response

        if self.web_page is not None and prefers_html(request.headers.get("accept")):
            return Response(self.web_page.body, media_type="text/html; charset=utf-8", headers=self.web_page.headers)
        return JSONResponse({"name": "rksmolvlm", "version": __version__, "model": self.model.id,
                             "endpoints": ["POST /v1/chat/completions", "GET /v1/models", "GET /props", "GET /health",
                                           "GET /metrics", "POST /api/chat", "POST /api/generate", "GET /api/tags",
                                           "POST /api/show", "GET /api/ps", "GET /api/version"]},
                            headers={"Vary": "Accept"})


_FINGERPRINT = f"rksmolvlm-{__version__}"


class _ClientGone(Exception):
    """The client closed the connection."""


def _sse_data(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _note(scope, **fields) -> None:
    """Facts about a request for its access-log line (never message text or image bytes)."""
    scope.setdefault("state", {}).setdefault("log", {}).update(fields)


async def _read_body(request, limit: int, configured: int | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (after letting the client finish
    sending up to a bound, so it can read the answer); ``configured`` is limits.max_body_bytes when
    ``limit`` was raised above it to carry a video."""
    from starlette.requests import ClientDisconnect

    where = f"limits.max_body_bytes = {limit:,}" if configured in (None, limit) else \
        f"{limit:,} (limits.max_body_bytes, raised to carry one video of video.max_bytes)"
    too_big = ApiError(413, f"the request body is over {where} bytes: send smaller or fewer images or videos (or "
                       "raise the limit in the server config)", "request_too_large")
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
        self._timer = loop.call_later(remaining, self._expire)

    def _expire(self) -> None:
        """The deadline: the job is dropped or aborted now, even while the response waits on a slow
        reader; its answer is the 504."""
        where = "while running" if self.job.started is not None else "waiting in the queue"
        self.service.cancel(self.job, "timeout", ApiError(
            504, f"the request took longer than server.request_timeout_s = {self.timeout_s:g} s ({where}) and was "
            "stopped: ask for fewer max_tokens or smaller images, or retry when the server is less busy",
            "request_timeout"))

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.service.cancel(self.job, "client_disconnect")  # now, not when the response next looks
                self.job.events.put_nowait(("gone", None))
                return

    async def next(self) -> tuple[str, object]:
        """The next event: ("delta", text), ("done", Answer) or ("error", ApiError); raises
        _ClientGone after cancelling the job when the client left."""
        kind, value = await self.job.events.get()
        if kind == "gone":
            self.service.cancel(self.job, "client_disconnect")
            raise _ClientGone
        return kind, value

    async def answer(self) -> Answer:
        """The finished answer of a non-streaming request (its text deltas passed over); raises the
        job's ApiError, or _ClientGone."""
        kind, value = await self.next()
        while kind == "delta":
            kind, value = await self.next()
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        self._watcher.cancel()
        self._timer.cancel()
        self.service.cancel(self.job, "client_disconnect")  # a no-op once the job has finished


class _EventStream:
    """A text/event-stream response that always closes its generator (cancelling the job) when the
    client goes away or the server stops."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str],
                 on_close: Callable[[], None] | None = None):
        self.chunks = chunks
        self.on_close = on_close  # also when the generator never started (closing it would not run its finally)
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
            if self.on_close is not None:
                self.on_close()


class _RequestLog:
    """ASGI middleware: request ids, one access-log line per request (sizes and counts, never
    content), request counters, and a JSON 500 without a stack trace for anything unexpected."""

    _PATHS = {"/v1/chat/completions", "/v1/models", "/health", "/health/ready", "/health/live", "/metrics", "/",
              "/props",
              "/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate"}

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
