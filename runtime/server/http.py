"""HTTP: the application, assembled from the API adapters over one Gateway, and the server's own
endpoints.

Fairness between clients starts here: a client is its address (``server.trust_forwarded_for``: the
proxy's X-Forwarded-For) and, when the server has an API key, the key it sends (hashed); each may have
``server.max_requests_per_client`` POSTs under way, from the first byte of the body read (and the
media checks off the event loop) to the last byte of the answer, so one client cannot hold every
place in the queue nor every thread of the pre-queue checks. The model's queue then takes clients in
turn (``service.FairQueue``).

The adapters (``runtime/server/openai.py``: ``/v1/chat/completions``, ``/v1/models``, ``/props``;
``runtime/server/ollama.py``: the Ollama API under ``/api``) share the Gateway and its exchange
(``runtime/server/exchange.py``); this module imports both and neither imports it. Here: the lifespan
(loading the model in the worker, systemd notifications and watchdog), ``GET /health`` (200 once the
bundle is loaded, 503 while loading, failed or stuck), ``GET /health/live``, ``GET /metrics``
(Prometheus text), ``GET /`` (the web page or a JSON index), OpenAI-style errors for what no adapter
answers, and the access log. A client that goes away, or a request over its time limit, aborts its
generation (the exchange).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Callable

from rksmolvlm import __version__
from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.cors import Cors
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.exchange import Gateway
from rksmolvlm.runtime.server.guards import RequestGuard
from rksmolvlm.runtime.server.metrics import rss_bytes
from rksmolvlm.runtime.server.notify import SystemdNotifier
from rksmolvlm.runtime.server.ollama import ollama_routes
from rksmolvlm.runtime.server.openai import OpenAiApi
from rksmolvlm.runtime.server.service import ModelService
from rksmolvlm.runtime.server.web import WebPage, page_enabled, prefers_html

if TYPE_CHECKING:
    from rksmolvlm.runtime.jail.decoder import JailedDecoder
    from rksmolvlm.runtime.structured import GrammarCompiler

__all__ = ["client_identity", "create_app"]

log = logging.getLogger("rksmolvlm.server")


# ==============================================================================================
# HTTP
# ==============================================================================================
def create_app(service: ModelService, config: ServerConfig, *, api_key: str | None = None,
               notifier: SystemdNotifier | None = None, on_fatal: Callable[[], None] | None = None,
               grammars: "GrammarCompiler | None" = None, decoder: "JailedDecoder | None" = None):
    """The Starlette application; its lifespan starts the service (loading the model) and stops it.
    ``grammars``: the served bundle's grammar compiler (structured output); None refuses it.
    ``decoder``: the jail media are opened in (runtime/jail/): its children are started with the app and
    stopped with it; None opens them in this process."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    gateway = Gateway(service, config, api_key, grammars, decoder)
    server = _Server(gateway, notifier or SystemdNotifier(None), on_fatal)
    routes = [
        *OpenAiApi(gateway).routes(),
        Route("/health", server.health, methods=["GET"]),
        Route("/health/ready", server.health, methods=["GET"]),
        Route("/health/live", server.live, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/", server.index, methods=["GET"]),
        *ollama_routes(gateway),  # /api/*: the Ollama API (runtime/server/ollama.py)
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan,
                    # starlette hands each handler only its own class, which its handler type cannot say
                    exception_handlers={ApiError: server.on_api_error,  # type: ignore[dict-item]
                                        HTTPException: server.on_http_error})
    # the per-client cap innermost: a cross-site or malformed request is refused before it takes a place
    app.add_middleware(_ClientShare, server=server)
    # Host, Origin and Content-Type checks (runtime/server/guards.py), inside CORS: its refusals carry CORS headers
    app.add_middleware(RequestGuard, config=config, api_key=api_key, on_refuse=server.note_refused)
    if config.server.cors_origins:  # inside the request log: preflights are logged and counted too
        app.add_middleware(Cors, origins=config.server.cors_origins)
    app.add_middleware(_RequestLog, server=server)
    app.state.api = server
    return app


def client_identity(scope, trust_forwarded_for: bool = False, keyed: bool = False) -> str:
    """Who sent a request, for the per-client cap and the fair queue: the peer address (the last
    X-Forwarded-For entry when the proxy in front is trusted to set it), and with ``keyed`` (the
    server has API keys) a hash of the bearer token sent, so clients behind one proxy stay apart."""
    headers = scope.get("headers", [])
    address = (scope.get("client") or ("", 0))[0] or "-"
    if trust_forwarded_for:
        forwarded = [value for name, value in headers if name.lower() == b"x-forwarded-for"]
        entries = [entry.strip() for entry in b",".join(forwarded).decode("latin-1").split(",") if entry.strip()]
        address = entries[-1][:64] if entries else address
    if not keyed:
        return address
    authorization = next((value for name, value in headers if name.lower() == b"authorization"), b"")
    token = authorization.partition(b" ")[2].strip()
    return f"{address} key:{hashlib.sha256(token).hexdigest()[:16]}" if token else address


class _Server:
    """The server's own endpoints, lifespan and error answers, over the adapters' Gateway."""

    def __init__(self, gateway: Gateway, notifier: SystemdNotifier, on_fatal: Callable[[], None] | None):
        self.gateway = gateway
        self.service = gateway.service
        self.config = gateway.config
        self.model = gateway.model
        self.metrics = gateway.metrics
        self.api_key = gateway.api_key
        self.decoder = gateway.decoder
        self.notifier = notifier
        self.on_fatal = on_fatal
        self.started = time.time()
        # server.web_ui: the page at GET / for browsers (runtime/server/web/); None: the JSON index only
        self.web_page = WebPage.load() if page_enabled(gateway.config, gateway.api_key is not None) else None

    # -- lifespan ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loop = asyncio.get_running_loop()
        tasks = []
        self.notifier.status(f"loading {self.model.id} ({self.model.engine} engine)")
        def on_state(state: str) -> None:  # called on the worker thread: the change is handled on the loop
            loop.call_soon_threadsafe(self._on_state, state)

        if self.decoder is not None:  # the children start while the model loads: the first request pays nothing
            self.decoder.pool.start()
        self.service.start(on_state)
        if self.notifier.watchdog_interval:
            tasks.append(loop.create_task(self._feed_watchdog(self.notifier.watchdog_interval)))
        try:
            yield
        finally:
            self.notifier.stopping("stopping: finishing the running request")
            for task in tasks:
                task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, self.service.close)
            if self.decoder is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.decoder.close)
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

        self.gateway.count_error(request.scope, error)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def note_refused(self, scope, error: ApiError) -> None:
        """A request refused before routing (runtime/server/guards.py): counted and logged like the rest."""
        self.gateway.count_error(scope, error)

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

    # -- the server's endpoints -------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        state = self.service.state
        if state == "ready" and self.service.stalled():
            state = "stalled"
        body = {"status": "ok" if state == "ready" else state, "ready": state == "ready", "model": self.model.id,
                "engine": self.model.engine, "queue": self.service.snapshot(),
                "uptime_s": round(time.time() - self.started, 1), "version": __version__}
        if self.decoder is not None:
            body["decode"] = self.decoder.snapshot()
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
            self.gateway.authorize(request)
        queue = self.service.snapshot()
        gauges: dict[str, tuple[str, list[tuple[dict[str, str], float]]]] = {
            "rksmolvlm_queue_depth": ("Requests waiting for the model.", [({}, queue["waiting"])]),
            "rksmolvlm_queue_capacity": ("Requests that may wait (server.queue_size).", [({}, queue["capacity"])]),
            "rksmolvlm_busy": ("1 while a request holds the model.", [({}, queue["running"])]),
            "rksmolvlm_ready": ("1 once the model is loaded and not stuck.",
                                [({}, int(self.service.state == "ready" and not self.service.stalled()))]),
            "rksmolvlm_process_resident_memory_bytes": ("Resident memory of the server process.",
                                                        [({}, rss_bytes())]),
            "rksmolvlm_info": ("The served model and engine.", [({"model": self.model.id, "engine": self.model.engine,
                                                                   "version": __version__}, 1)]),
        }
        if self.decoder is not None:
            pool = self.decoder.snapshot()
            gauges["rksmolvlm_decode_workers"] = ("Decoding child processes alive (decode.workers).",
                                                  [({}, pool.get("alive", 0))])
            gauges["rksmolvlm_decode_busy"] = ("Decoding child processes at work.", [({}, pool.get("busy", 0))])
            gauges["rksmolvlm_decode_killed"] = (
                "Decoding children killed since the start, by reason (deadline, abort, crash: memory or CPU).",
                [({"reason": str(reason)}, n) for reason, n in sorted(pool.get("killed", {}).items())])
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


class _ClientShare:
    """ASGI middleware: who sent each request (``scope["state"]["client"]``, for the fair queue), and
    each client's POSTs under way capped at ``server.max_requests_per_client`` (429
    client_queue_full). A request holds its place until its answer has been sent (or its client
    left), so the cap covers the body read and the pre-queue checks as well as the queue."""

    def __init__(self, app, server: _Server):
        self.app = app
        self.server = server
        self.limit = server.config.server.requests_per_client()
        self.trusted_proxy = server.config.server.trust_forwarded_for
        self.keyed = server.api_key is not None
        self.under_way: dict[str, int] = {}  # client → its POSTs under way (clients with none are dropped)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = client_identity(scope, self.trusted_proxy, self.keyed)
        scope.setdefault("state", {})["client"] = client
        if scope["method"] != "POST":  # the probes and lists are cheap; POSTs are the work
            return await self.app(scope, receive, send)
        held = self.under_way.get(client, 0)
        if held >= self.limit:
            wait = self.server.service.retry_after()
            error = ApiError(429, f"this client already has {held} requests under way (server.max_requests_per_client"
                             f" = {self.limit}): wait for an answer before sending another, or raise the key in the "
                             f"server config; retry after {wait} s", "client_queue_full",
                             headers={"Retry-After": str(wait)})
            self.server.note_refused(scope, error)
            return await _send_error(send, error, ollama=scope["path"].startswith("/api/"))
        self.under_way[client] = held + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.under_way[client] - 1
            if left:
                self.under_way[client] = left
            else:
                del self.under_way[client]


class _RequestLog:
    """ASGI middleware: request ids, one access-log line per request (sizes and counts, never
    content), request counters, and a JSON 500 without a stack trace for anything unexpected."""

    _PATHS = {"/v1/chat/completions", "/v1/models", "/health", "/health/ready", "/health/live", "/metrics", "/",
              "/props",
              "/api/version", "/api/tags", "/api/show", "/api/ps", "/api/chat", "/api/generate"}

    def __init__(self, app, server: _Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))  # an echoed path is never read as HTML
                message = {**message, "headers": headers}
            await send(message)

        start = time.perf_counter()
        try:
            names = [name.lower() for name, _ in scope.get("headers", [])]
            if b"transfer-encoding" in names and b"content-length" in names:
                # two framings a proxy in front may read differently (request smuggling): neither is trusted
                error = ApiError(400, "the request has both Content-Length and Transfer-Encoding: send one "
                                 "(the connection is closed)", "bad_http_request")
                body = json.dumps(error.body()).encode()
                await send_with_id({"type": "http.response.start", "status": 400,
                                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                                (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - logged with its trace here; the client gets no trace
            log.exception("request %s failed", request_id)
            self.server.metrics.inc("rksmolvlm_errors_total", code="internal_error")
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
            self.server.metrics.inc("rksmolvlm_requests_total", path=label, status=str(code))
            if label not in ("/health", "/health/live", "/health/ready", "/metrics") or code >= 400:
                facts = " ".join(f"{k}={v}" for k, v in scope["state"].get("log", {}).items())
                client = scope.get("client") or ("-", 0)
                log.info("%s %s %s %.3fs client=%s id=%s %s", scope["method"], label, code,
                         time.perf_counter() - start, client[0], request_id, facts)


# ==============================================================================================
# Private helpers
# ==============================================================================================
async def _send_error(send, error: ApiError, ollama: bool) -> None:
    """Answer ``error`` from a middleware: the OpenAI error body, or Ollama's under /api/."""
    body = json.dumps({"error": error.message} if ollama else error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
