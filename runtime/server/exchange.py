"""The exchange: one request's trip through the model's queue, shared by every API adapter.

An adapter (``openai.py``: chat completions; ``ollama.py``: /api/chat and /api/generate; a Responses
API would be a third) only translates: its body into a chat completion payload for the
RequestReader, and the job's events into its own wire format. Everything between is here:

- ``Gateway``: the common entry over one ModelService — the API key, a ready model, the body read
  within its limit (``read_body``), the request read off the event loop, the job queued
  (``enqueue`` → an ``Exchange``), errors counted and noted for the access log.
- ``Exchange``: the job as its HTTP request sees it — the worker's events, the client going away
  (``ClientGone``) and the request's deadline (a 504) merged into one sequence of events.
- ``Gateway.stream``: the event pump — a streamed response (``EventStream``) whose bytes an
  adapter's ``Frames`` write from the events: an opening frame at once (queue wait and prefill do
  not eat the client's first-byte timeout), one per text delta, then the answer's or the error's.
- ``Gateway.complete``: the finished answer of a non-streamed request, or None when the client left.

Events are ``("delta", text)``, ``("done", Answer)`` and ``("error", ApiError)``; the last two end a job.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import time
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, Iterable, MutableMapping, Protocol

from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.media_checks import MEDIA_CLIENT, video_decoder_available
from rksmolvlm.runtime.server.requests import ChatRequest, RequestReader

if TYPE_CHECKING:
    from starlette.requests import Request

    from rksmolvlm.runtime.jail.decoder import JailedDecoder
    from rksmolvlm.runtime.server.service import Answer, Job, ModelService
    from rksmolvlm.runtime.structured import GrammarCompiler

__all__ = ["ClientGone", "EventStream", "Exchange", "Frames", "Gateway", "note", "read_body"]


class ClientGone(Exception):
    """The client closed the connection."""


def note(scope: MutableMapping[str, Any], **fields: object) -> None:
    """Facts about a request for its access-log line (never message text or image bytes)."""
    scope.setdefault("state", {}).setdefault("log", {}).update(fields)


async def read_body(request: Request, limit: int, configured: int | None = None) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: at once when the declared
    Content-Length is over it, else after letting a chunked client finish sending up to a bound,
    so it can read the answer; ``configured`` is limits.max_body_bytes when
    ``limit`` was raised above it to carry a video. Raises ClientGone when the client left."""
    from starlette.requests import ClientDisconnect

    where = f"limits.max_body_bytes = {limit:,}" if configured in (None, limit) else \
        f"{limit:,} (limits.max_body_bytes, raised to carry one video of video.max_bytes)"
    too_big = ApiError(413, f"the request body is over {where} bytes: send smaller or fewer images or videos (or "
                       "raise the limit in the server config)", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big  # by the head alone, before any byte: nothing waits for a body it would refuse
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                if size > 4 * limit + 65536:
                    # stop reading, and close after the answer: else the server would go on discarding
                    # whatever an endless chunked sender sends, on a connection kept alive
                    too_big.headers["Connection"] = "close"
                    break
                continue
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone from None
    if size > limit:
        raise too_big
    return b"".join(chunks)


class Frames(Protocol):
    """How an adapter writes one job's events on its stream (server-sent events, NDJSON, …)."""

    def opening(self) -> bytes:
        """What goes out at once, before the job runs."""

    def delta(self, text: str) -> bytes:
        """One piece of the answer's text (empty bytes: nothing to send yet)."""

    def done(self, answer: Answer) -> Iterable[bytes]:
        """The closing frames of a finished answer."""

    def error(self, error: ApiError) -> Iterable[bytes]:
        """The closing frames of a job that failed after the stream began."""


class Exchange:
    """One job as its HTTP request sees it: the worker's events, the client going away and the
    request's deadline, merged into one stream of events."""

    def __init__(self, job: Job, service: ModelService, receive, timeout_s: float, since: float | None = None):
        self.job = job
        self.service = service
        self.timeout_s = timeout_s
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch(receive))
        # the deadline counts from the request's arrival (``since``): reading and checking its media count too
        remaining = max(0.0, (since if since is not None else job.received) + timeout_s - time.monotonic())
        self._timer = loop.call_later(remaining, self._expire)

    async def next(self) -> tuple[str, Any]:
        """The next event: ("delta", text), ("done", Answer) or ("error", ApiError); raises
        ClientGone after cancelling the job when the client left."""
        kind, value = await self.job.events.get()
        if kind == "gone":
            self.service.cancel(self.job, "client_disconnect")
            raise ClientGone
        return kind, value

    async def answer(self) -> Answer:
        """The finished answer of a non-streaming request (its text deltas passed over); raises the
        job's ApiError, or ClientGone."""
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


class EventStream:
    """A streamed response (text/event-stream unless the headers say otherwise) that always closes its
    generator (cancelling the job) when the client goes away or the server stops."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str],
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


class Gateway:
    """The common entry of every adapter over one ModelService: the key, a ready model, the bounded
    body, the checked request, the queued job and its events; counting and noting on the way."""

    def __init__(self, service: ModelService, config: ServerConfig, api_key: str | None = None,
                 grammars: GrammarCompiler | None = None, decoder: "JailedDecoder | None" = None):
        self.service = service
        self.config = config
        self.model = service.model
        self.metrics = service.metrics
        self.api_key = api_key
        self.grammars = grammars  # the served bundle's grammar compiler (None: no structured output)
        self.decoder = decoder  # the jail media are opened in (None: in this process)
        self.reader = RequestReader(config, service.model, grammars, decoder)
        self.body_limit = config.body_limit(self.takes_video())  # a video's data: URI must get through

    def takes_video(self) -> bool:
        """The model takes video, the server allows it and can decode it."""
        return self.model.video is not None and self.config.video.enabled and video_decoder_available()

    def authorize(self, request: Request) -> None:
        """Refuse a request without the server's API key (when it has one) with a 401."""
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

    def count_error(self, scope: MutableMapping[str, Any], error: ApiError) -> None:
        """An error answered (whatever its wire format): counted by code and noted for the access log."""
        self.metrics.inc("rksmolvlm_errors_total", code=error.code)
        note(scope, error=error.code)

    async def admit(self, request: Request, read: Callable[[bytes], object], limit: int | None = None):
        """The common entry of the generating endpoints: the key, a ready model, the body within
        its limit (``body_limit`` unless given), then ``read(body)`` off the event loop. None when
        the client left meanwhile."""
        request.scope.setdefault("state", {})["arrived"] = time.monotonic()  # the request's deadline starts here
        self.authorize(request)
        if self.service.state != "ready":
            raise self.service.unavailable()
        try:
            body = await read_body(request, limit or self.body_limit, self.config.limits.max_body_bytes)
        except ClientGone:
            return None
        # the media checks in the thread pool wait for a jail child as this client (its turn among clients)
        MEDIA_CLIENT.set(request.scope.get("state", {}).get("client") or None)
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(None, context.run, read, body)

    def enqueue(self, request: Request, chat: ChatRequest) -> Exchange:
        """Note what the request holds, queue its job, and watch its client and deadline."""
        note(request.scope, images=chat.images, image_bytes=chat.image_bytes, stream=chat.stream,
             max_tokens=chat.config.max_new_tokens)
        if chat.videos:
            note(request.scope, videos=chat.videos, video_bytes=chat.video_bytes)
        if chat.format is not None:  # structured output: json_schema, json_object or tool_call
            note(request.scope, format=chat.format.kind)
        state = request.scope["state"]
        job = self.service.submit(chat, asyncio.get_running_loop(), state["request_id"], state.get("client", ""))
        return Exchange(job, self.service, request.receive, self.config.server.request_timeout_s, state.get("arrived"))

    def note_answer(self, request: Request, answer: Answer) -> None:
        note(request.scope, prompt_tokens=answer.prompt_tokens, completion_tokens=len(answer.token_ids),
             finish=answer.finish_reason, queue_ms=round(answer.queue_ms))

    async def complete(self, request: Request, exchange: Exchange) -> Answer | None:
        """The finished answer of a non-streamed request (noted), None when the client left; raises the
        job's ApiError. The exchange is closed either way."""
        try:
            answer = await exchange.answer()
        except ClientGone:
            return None
        finally:
            exchange.close()
        self.note_answer(request, answer)
        return answer

    def stream(self, request: Request, exchange: Exchange, frames: Frames, headers: dict[str, str]) -> EventStream:
        """The streamed response of ``exchange``: ``frames`` write its events as they come."""
        return EventStream(self._pump(request, exchange, frames), headers, on_close=exchange.close)

    async def _pump(self, request: Request, exchange: Exchange, frames: Frames) -> AsyncGenerator[bytes, None]:
        try:
            yield frames.opening()
            while True:
                kind, value = await exchange.next()
                if kind == "delta":
                    chunk = frames.delta(value)
                    if chunk:  # empty: the adapter holds the text back (a tool call until it is complete)
                        yield chunk
                    continue
                if kind == "done":
                    self.note_answer(request, value)
                    chunks = frames.done(value)
                else:
                    self.count_error(request.scope, value)
                    chunks = frames.error(value)
                for chunk in chunks:
                    yield chunk
                return
        except ClientGone:
            return
        finally:
            exchange.close()
