"""The worker: one thread owns the pipeline (and so the NPU) and runs one request at a time from a
bounded queue (full: 429 with Retry-After); answer text is cut at stop strings as it streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rksmolvlm.errors import ImageError, RkSmolVLMError
from rksmolvlm.processing.prompt import assistant_content
from rksmolvlm.runtime.server_config import ServerConfig
from rksmolvlm.runtime.server.requests import ApiError, ChatRequest, ServedModel

if TYPE_CHECKING:
    from rksmolvlm.runtime.engines import PerfStats
    from rksmolvlm.runtime.server.metrics import Metrics

__all__ = ["Answer", "Job", "ModelService", "open_pipeline"]

log = logging.getLogger("rksmolvlm.server")


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
        return assistant_content(text)

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
        from rksmolvlm.runtime.pipeline import ContextError

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
    from rksmolvlm.runtime.pipeline import Pipeline

    cores = list(config.npu_cores) if config.npu_cores is not None else None
    from rksmolvlm.runtime.engines import GenerationConfig

    # librkllmrt 1.2.x takes max_new_tokens at start-up only: make room for the largest request.
    startup = GenerationConfig(max_new_tokens=max(1, min(config.limits.max_tokens, bundle.max_context - 1)))
    vision, llm = bundle.make_engines(engine, library=config.rkllm_library, cores=cores, config=startup)
    return Pipeline(bundle, vision, llm, image_cache_size=config.image_cache_size,
                    max_pixels=config.limits.max_image_pixels)
