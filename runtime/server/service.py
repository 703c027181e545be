"""The worker: one thread owns the runner (and so the NPU) and runs one request at a time from a
bounded queue (full: 429 with Retry-After), streaming the runner's text deltas to the request. The
queue is fair: it takes clients in turn, not requests in arrival order (``FairQueue``)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from rksmolvlm.errors import ImageError, RkSmolVLMError
from rksmolvlm.runtime.server.config import ServerConfig
from rksmolvlm.runtime.server.errors import ApiError
from rksmolvlm.runtime.server.model import ServedModel
from rksmolvlm.runtime.server.requests import ChatRequest

if TYPE_CHECKING:  # imported for `rksmolvlm --help`: numpy, torch and friends load on use
    from rksmolvlm.runtime.decoding import MediaDecoder
    from rksmolvlm.runtime.engines import PerfStats
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner, RunnerFactory
    from rksmolvlm.runtime.server.metrics import Metrics
    from rksmolvlm.runtime.video import VideoOptions

__all__ = ["Answer", "FairQueue", "Job", "ModelService", "open_runner", "video_options"]

log = logging.getLogger("rksmolvlm.server")


# ==============================================================================================
# The worker: one runner, one thread, a bounded queue
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
    (``delta`` text, ``done`` Answer, ``error`` ApiError) to the request's event loop. ``client``
    names who sent it (the fair queue's turns)."""

    def __init__(self, request: ChatRequest, loop: asyncio.AbstractEventLoop, request_id: str, client: str = ""):
        self.request = request
        self.id = request_id
        self.client = client
        self.turn = (0, 0)  # the fair queue's order: (the client's turn, arrival)
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


class FairQueue:
    """The jobs waiting for the worker, taken clients in turn (start-time fair queueing): a job's turn
    is its client's next one, but never earlier than the turn of the job last taken; the smallest
    turn goes first, arrival breaking ties. A client's burst of N requests therefore waits behind
    each other client's next request, and a client that has waited gets no credit for the past."""

    def __init__(self):
        self._jobs: list[Job] = []
        self._next: dict[str, int] = {}  # client → its next turn (only clients ahead of the current turn)
        self._now = 0  # the turn of the job last taken
        self._arrivals = itertools.count()

    def append(self, job: Job) -> None:
        turn = max(self._now, self._next.get(job.client, 0))
        self._next[job.client] = turn + 1
        job.turn = (turn, next(self._arrivals))
        self._jobs.append(job)

    def popleft(self) -> Job:
        job = min(self._jobs, key=lambda waiting: waiting.turn)
        self._jobs.remove(job)
        self._now = job.turn[0]
        self._next = {client: turn for client, turn in self._next.items() if turn > self._now}
        return job

    def remove(self, job: Job) -> None:
        self._jobs.remove(job)

    def clear(self) -> None:
        self._jobs.clear()

    def __contains__(self, job: Job) -> bool:
        return job in self._jobs

    def __iter__(self):
        return iter(sorted(self._jobs, key=lambda waiting: waiting.turn))

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs)


class ModelService:
    """The one runner that owns the NPU. A worker thread loads it, then runs queued jobs one at a
    time; the HTTP side submits jobs, reads their events and cancels them. Of the runner it uses
    ``generate``, ``abort`` and ``close`` only."""

    def __init__(self, load: Callable[[], "Runner"], model: ServedModel, queue_size: int, metrics: "Metrics",
                 stall_timeout_s: float = 120.0):
        self._load = load
        self.model = model
        self.queue_size = queue_size
        self.metrics = metrics
        self.stall_timeout_s = stall_timeout_s
        self.state = "starting"  # → loading → ready | failed; → stopped
        self.error: str | None = None
        self.exit_code = 0
        self.runner: Runner | None = None
        self._cond = threading.Condition()
        self._waiting = FairQueue()
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

    def drain(self, grace_s: float) -> None:
        """Begin stopping (SIGTERM): refuse new jobs and answer the waiting ones with a 503 now; the
        running one has ``grace_s`` seconds to finish, then it is aborted and answered with the 503."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            if self.state in ("loading", "ready"):
                self.state = "stopping"
            drained = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
            current = self._current
        for job in drained:
            self._refuse_for_shutdown(job)
        if current is not None:
            timer = threading.Timer(grace_s, self._refuse_for_shutdown, (current,))
            timer.daemon = True
            timer.start()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones, abort the running one, stop the worker, free the engines."""
        with self._cond:
            self._closing = True
            drained = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in drained:
            self._refuse_for_shutdown(job)
        current = self._current
        if current is not None:
            self._refuse_for_shutdown(current)
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def _refuse_for_shutdown(self, job: Job) -> None:
        """Drop or abort ``job`` and answer it 503 shutting_down (nothing if it has finished)."""
        self.cancel(job, "shutdown", ApiError(503, "the server is shutting down: retry in a moment", "shutting_down",
                                              headers={"Retry-After": "5"}))

    def _main(self) -> None:
        try:
            runner = self.runner = self._load()
        except BaseException as exc:  # noqa: BLE001 - reported, then the server stops
            self.error = str(exc) if isinstance(exc, RkSmolVLMError) else f"{type(exc).__name__}: {exc}"
            self.exit_code = exc.exit_code if isinstance(exc, RkSmolVLMError) else 1
            if not isinstance(exc, RkSmolVLMError):
                log.exception("loading the model failed")
            self.state = "failed"
            self._on_state("failed")
            return
        with self._cond:
            if not self._closing:  # a drain during the load keeps "stopping"
                self.state = "ready"
        self._on_state(self.state)
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        break
                    job = self._current = self._waiting.popleft()
                try:
                    self._run(job, runner)
                finally:
                    with self._cond:
                        self._current = None
                        job.finished = True
        finally:
            try:
                runner.close()
            except Exception:  # noqa: BLE001 - the server is stopping anyway
                log.exception("closing the engines failed")

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, request: ChatRequest, loop: asyncio.AbstractEventLoop, request_id: str, client: str = "") -> Job:
        """Queue ``request`` as ``client``'s (its turn in the fair queue); 429 queue_full when the queue is full."""
        with self._cond:
            if self.state != "ready" or self._closing:
                raise self.unavailable()
            held = len(self._waiting) + (self._current is not None)
            if held >= self.queue_size + 1 and not self._make_room(client):
                wait = self.retry_after()
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting for the model "
                               f"(server.queue_size = {self.queue_size}); retry after {wait} s", "queue_full",
                               headers={"Retry-After": str(wait)})
            job = Job(request, loop, request_id, client)
            self._waiting.append(job)
            self._cond.notify()
            return job

    def _make_room(self, client: str) -> bool:
        """The queue is full: a client may fill it alone, but not against others — the newest waiting job of
        the client holding the most jobs gives way when that client holds at least two more than ``client``
        (it is answered 429 client_queue_full). True when a place was freed. Called under the lock."""
        waiting: dict[str, list[Job]] = {}
        for job in self._waiting:
            waiting.setdefault(job.client, []).append(job)
        count = {c: len(jobs) for c, jobs in waiting.items()}
        if self._current is not None:
            count[self._current.client] = count.get(self._current.client, 0) + 1
        others = [c for c in waiting if c != client]
        if not others:
            return False
        heaviest = max(others, key=lambda c: count[c])
        if count[heaviest] < count.get(client, 0) + 2:
            return False
        newest = max(waiting[heaviest], key=lambda job: job.received)
        self._waiting.remove(newest)
        newest.cancel_reason = "displaced"
        newest.finished = True
        wait = self.retry_after()
        newest.post("error", ApiError(429, f"the model's queue is shared and full (server.queue_size = "
                                      f"{self.queue_size}): this client holds the most places, so its newest waiting "
                                      f"request gave its place to another client's; retry after {wait} s",
                                      "client_queue_full", headers={"Retry-After": str(wait)}))
        self.metrics.inc("rksmolvlm_dropped_queued_total", reason="displaced")
        return True

    def cancel(self, job: Job, reason: str, answer: ApiError | None = None) -> bool:
        """Stop ``job``: drop it from the queue, or abort its generation (client gone, timeout, shutdown);
        ``answer`` is posted to it first (before the worker's last event). False when it had finished
        or was already stopped."""
        with self._cond:
            if job.finished or job.cancel_reason:
                return False
            job.cancel_reason = reason
            if answer is not None:
                job.post("error", answer)
            if job is not self._current:  # waiting (or just taken off the queue by close/drain)
                if job in self._waiting:
                    self._waiting.remove(job)
                job.finished = True
                self.metrics.inc("rksmolvlm_dropped_queued_total", reason=reason)
            elif job is self._current and self.runner is not None:
                self.runner.abort()  # under the lock: the worker cannot have moved on to another job
            return True

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

    def _run(self, job: Job, runner: Runner) -> None:
        from rksmolvlm.errors import VideoError
        from rksmolvlm.runtime.jail.decoder import DecoderBusyError, DecoderClosedError
        from rksmolvlm.runtime.runner import ContextError, InputError
        from rksmolvlm.runtime.server.media_checks import video_api_error

        request = job.request
        started = job.started = self._progress = time.monotonic()
        queue_ms = (started - job.received) * 1000
        self.metrics.observe("rksmolvlm_queue_wait_seconds", queue_ms / 1000)
        aborting = False
        try:
            generation = runner.generate(request.messages, request.config)
            for delta in generation:
                self._progress = time.monotonic()
                if aborting:
                    continue
                if job.cancel_reason:  # again from this thread: an abort before the runner started is cleared
                    runner.abort()
                    aborting = True
                elif request.stream:
                    job.post("delta", delta)
        except ImageError as exc:
            return self._fail(job, ApiError(400, str(exc), exc.code, "messages"))  # invalid_image or the limit
        except VideoError as exc:  # the reader probed it; decoding the sampled frames can still fail or run out
            return self._fail(job, video_api_error(exc, "messages"))
        except ContextError as exc:
            return self._fail(job, ApiError(400, str(exc), "context_length_exceeded", "messages"))
        except (DecoderBusyError, DecoderClosedError) as exc:  # the jail is stopping (its worker child is reserved)
            return self._fail(job, ApiError(503, f"{exc}", "decoder_unavailable", headers={"Retry-After": "5"}))
        except InputError as exc:
            return self._fail(job, ApiError(400, str(exc), "invalid_value", "messages"))
        except RkSmolVLMError as exc:
            log.error("request %s: the engine failed: %s", job.id, exc)
            return self._fail(job, ApiError(500, f"the engine failed: {exc}", "engine_error"))
        except Exception:
            log.exception("request %s failed", job.id)
            return self._fail(job, ApiError(500, f"internal error (request {job.id}): see the server log",
                                            "internal_error"))
        finish = generation.finish_reason or "stop"
        if job.cancel_reason and finish != "stop":
            finish = "abort"
            self.metrics.inc("rksmolvlm_aborted_generations_total", reason=job.cancel_reason)
        result = Answer(generation.text, list(generation.token_ids), finish, generation.prompt_tokens,
                        generation.stats, queue_ms)
        self._record(started, result)
        self._finish(job, "done", result)

    def _fail(self, job: Job, error: ApiError) -> None:
        self._finish(job, "error", error)

    def _finish(self, job: Job, kind: str, value) -> None:
        with self._cond:  # finished first: a late cancel() must not abort the engine for nothing
            job.finished = True
        job.post(kind, value)

    def _record(self, started: float, result: Answer) -> None:
        s, m = result.stats, self.metrics
        seconds = time.monotonic() - started
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * seconds
        m.inc("rksmolvlm_prompt_tokens_total", result.prompt_tokens)
        m.inc("rksmolvlm_completion_tokens_total", len(result.token_ids))
        if result.token_ids:
            m.observe("rksmolvlm_time_to_first_token_seconds", result.queue_ms / 1000 + s.first_token_ms / 1000)
        if s.generate_tokens > 1 and s.generate_ms > 0:
            m.observe("rksmolvlm_decode_tokens_per_second", (s.generate_tokens - 1) / (s.generate_ms / 1000))
        if s.video_frames or s.video_cached_frames:
            m.inc("rksmolvlm_video_frames_total", s.video_frames, source="decoded")
            m.inc("rksmolvlm_video_frames_total", s.video_cached_frames, source="cache")
            m.inc("rksmolvlm_video_decode_seconds_total", s.video_decode_ms / 1000)
        for image in getattr(s, "image_tiling", ()):
            m.observe("rksmolvlm_image_tiles", image["tiles"])
        if s.vision_tiles:
            m.inc("rksmolvlm_vision_tiles_total", s.vision_tiles)
            m.inc("rksmolvlm_vision_seconds_total", s.vision_ms / 1000)
            m.observe("rksmolvlm_vision_seconds_per_tile", s.vision_ms / 1000 / s.vision_tiles)
        m.observe("rksmolvlm_generation_seconds", seconds)


def video_options(config: ServerConfig) -> "VideoOptions":
    """The runner's video defaults and limits from the ``[video]`` section."""
    from rksmolvlm.runtime.video import VideoOptions

    video = config.video
    return VideoOptions(fps=video.fps, max_frames=video.max_frames, limits=video.limits(),
                        cache_frames=video.cache_frames)


def open_runner(bundle: "RuntimeBundle", config: ServerConfig, engine: str, runners: "RunnerFactory",
                decoder: "MediaDecoder | None" = None) -> "Runner":
    """The runner the server runs, opened by ``runners`` (the serve verb's): the bundle's engines with the
    configured cores and library, room for the largest max_tokens a request may ask for, the configured
    image cache and pixel limit, the ``[video]`` defaults and limits (SmolVLM2 bundles), and the media
    decoder (the server's jail; None: in this process)."""
    from rksmolvlm.runtime.engines import EngineOptions

    cores = tuple(config.npu_cores) if config.npu_cores is not None else None
    options = EngineOptions(threads=config.threads, library=config.rkllm_library, cores=cores,
                            max_new_tokens=config.limits.max_tokens)
    limits = config.limits
    decode = limits.decode_limits()
    resolution = config.images.resolution(bundle.settings.tile_size)  # a ConfigError before any engine starts
    return runners.open(bundle, engine, options, image_cache_size=config.image_cache_size,
                        max_pixels=limits.max_image_pixels, default_detail=config.images.default_detail,
                        fit_answer_tokens=config.images.fit_answer_tokens, decode_limits=decode, resolution=resolution,
                        video=video_options(config) if bundle.video_settings is not None else None,
                        decoder=decoder)
