"""The runner: wires the parts and nothing else (ExecuTorch's MultimodalRunner is the model).

image encoder (tiling + feature cache + vision engine) → assembler (messages → chunks → embeddings)
→ LLM engine (prefill, stream ids) → text stream (stop ids and strings, text, finish reason).

``Runner.generate`` answers a conversation from an empty KV cache. A ``Session`` keeps the cache
across turns: when a request repeats the session's previous messages, then the answer it generated,
then new messages, only the new part is rendered, tiled, encoded and prefilled (the template text
after the answer and the new images). Anything else (edited history, other images, another session
having used the engine since) starts over. One request runs at a time.

Structured answers (``GenerationConfig.grammar``, compiled for this bundle by
``GrammarCompiler.for_bundle``) pass through the same wiring: the engine ends a complete answer with
the bundle's end-of-utterance id, so the text stream finishes "stop" and a session continues after
it as after free text; max_new_tokens cuts one with finish_reason "length" and the partial text.

Image detail (``ImagePart.detail``, OpenAI's ``image_url.detail``): "high" tiles an image the way
the checkpoint's processor does (tiles plus the global image), "low" as one unsplit tile (the
processor's ``do_image_splitting=False``), "auto" as the runner's ``default_detail`` says: "high",
"low", or "auto-fit" (the default) — split, unless the images do not fit the context. Fitting is
planned from the image headers before anything is decoded: when the prompt with every image as
asked leaves less room than the answer's, auto-fit images are unsplit one at a time, the one whose
split costs the most tokens first (earlier images first among equals), until the answer fits — the
fewest images lose their split. The answer's room is max_new_tokens, or, when the request lets the
answer be capped to what is left (``cap_to_context``: the server's max_tokens is a ceiling),
max_new_tokens but at most ``fit_answer_tokens``. Explicit "high" images are never unsplit; a prompt
that does not fit even with every auto-fit image unsplit is a ContextError. The conversation is
rendered and tokenized once (``Assembler.draft``): other layouts of the images are priced on that
draft by their blocks' lengths, and the prompt is assembled once, with the layouts of the tiled images
(a header may not tell all: an orientation stored after the pixels).

Resolution budgets (``processing.image.Resolution``: the processor's longest_edge k·T, the most
tiles, or no split): an image is tiled at its own ``ImagePart.resolution`` (fields it leaves unset: the
runner's), else at the runner's ``resolution`` (the command line's --image-size/--max-tiles/--no-split, the server's
images.longest_edge/max_tiles); "high" and "auto" split at that budget, "low" and auto-fit unsplit
at its longest_edge — each exactly transformers' processor with the matching settings. The chosen
tiling of every image is in ``Generation.stats.image_tiling``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar


from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.processing.assembler import Draft, ImageChunk, Prompt, PromptError, VideoLayout
from rksmolvlm.processing.content import ImagePart, Message, TextPart, VideoPart, conversation, media_parts
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import DEFAULT_MAX_PIXELS, Resolution
from rksmolvlm.processing.image_safety import DecodeLimits
from rksmolvlm.processing.prompt import Rendered
from rksmolvlm.runtime.decoding import DecodeAborted, MediaDecoder
from rksmolvlm.runtime.engines import EngineOptions, GenerationConfig, LlmEngine, PerfStats, VisionEncoder
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.text_stream import TextStream
from rksmolvlm.runtime.vision import UNSPLIT, ImageEncoder, PreparedImage
from rksmolvlm.runtime.video import VideoEncoder, VideoOptions, VideoPlan

__all__ = ["Runner", "RunnerFactory", "Session", "Generation", "ContextError", "InputError", "DEFAULT_DETAILS",
           "choose_unsplit", "RequestStats"]

_T = TypeVar("_T")

# What an image's detail "auto" means (the server's images.default_detail): see the module docstring.
DEFAULT_DETAILS = ("auto-fit", "high", "low")


class ContextError(RkSmolVLMError):
    """The prompt plus max_new_tokens does not fit the model's context."""


class InputError(RkSmolVLMError):
    """The conversation cannot be answered as given (a bad message, video, …)."""


@dataclass
class RequestStats(PerfStats):
    """PerfStats plus what the pipeline chose: per image of the prompt (in order) its tiling —
    ``tiles`` tower passes (rows·cols + the global image, or 1 unsplit), rows, cols, longest_edge."""

    image_tiling: list = field(default_factory=list)


@dataclass
class Generation:
    """One answer: iterate for text deltas; afterwards the fields hold the result."""

    _stream: Iterator[str] = field(default_factory=lambda: iter(()), repr=False)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0  # the whole context before generation (reused + prefilled)
    reused_tokens: int = 0  # of which already in the engine's KV cache
    prefill_ids: list[int] = field(default_factory=list)  # the ids prefilled for this turn
    stats: RequestStats = field(default_factory=RequestStats)

    def __iter__(self) -> Iterator[str]:
        return self._stream

    def consume(self) -> "Generation":
        for _ in self:
            pass
        return self


@dataclass
class _Turn:
    """What one request prefills: the prompt (whole or the suffix after the kept history)."""

    prompt: Prompt
    images: list[PreparedImage]
    videos: list[VideoPlan]
    held_tokens: int  # already in the KV cache
    full_text: str  # the whole conversation's rendered prompt


@dataclass
class _Held:
    """What the KV cache holds for a session: ``messages`` rendered as ``prompt_text``, then the
    model's answer (its visible ``answer``; ended by the template's <end_of_utterance> when
    ``stopped``)."""

    signature: list[tuple]
    prompt_text: str
    answer: str
    stopped: bool


class Runner:
    """One bundle, one vision engine, one LLM engine."""

    def __init__(self, bundle: RuntimeBundle, vision: VisionEncoder, llm: LlmEngine, *,
                 image_cache_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS,
                 table: EmbeddingTable | None = None, default_detail: str = "auto-fit",
                 fit_answer_tokens: int = 256, decode_limits: DecodeLimits | None = None,
                 video: VideoOptions | None = None, resolution: Resolution | None = None,
                 decoder: MediaDecoder | None = None):
        if default_detail not in DEFAULT_DETAILS:
            raise ValueError(f"default_detail {default_detail!r} is not one of {', '.join(DEFAULT_DETAILS)}")
        self.default_detail = default_detail
        self.fit_answer_tokens = max(1, fit_answer_tokens)
        self.bundle = bundle
        self.resolution = resolution or Resolution()
        self.resolution.check(bundle.settings.tile_size)  # ValueError naming the valid sizes
        self.assembler = bundle.assembler
        self.vision = vision
        # the decoder (in-process, or the server's jail) is the caller's: the runner does not close it
        self.images = ImageEncoder(vision, bundle.settings, image_cache_size, max_pixels, decode_limits, decoder)
        video_settings = bundle.video_settings
        self.videos = (VideoEncoder(vision, video_settings, video, decoder) if video_settings is not None
                       else None)
        self.llm = llm
        if table is None:
            own = llm.embedding_table()
            table = EmbeddingTable.from_array(own) if own is not None else bundle.embedding_table()
        self.table = table
        self._lock = threading.Lock()
        self._abort = threading.Event()  # checked between stages, not only while decoding
        self._owner: Session | None = None  # the session whose conversation the KV cache holds

    # -- requests ---------------------------------------------------------------------------------
    def generate(self, messages: Sequence[Any], config: GenerationConfig | None = None) -> Generation:
        """Answer ``messages`` (Message records or dicts) from an empty KV cache."""
        return self._start(None, messages, config)

    def session(self) -> "Session":
        return Session(self)

    def abort(self) -> None:
        """Stop the running request soon: between images, before the prefill or while decoding
        (callable from another thread)."""
        self._abort.set()
        self.llm.abort()

    def close(self) -> None:
        """Free both engines."""
        errors = []
        for close in (self.images.close, self.llm.close):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - close both, report the first
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- the wiring -------------------------------------------------------------------------------
    def _start(self, session: "Session | None", messages, config) -> Generation:
        config = config or GenerationConfig()
        if not config.stop_ids:
            config = replace(config, stop_ids=self.bundle.stop_ids)
        grammar = config.grammar
        if grammar is not None and grammar.vocab_size != self.bundle.manifest.model.vocab_size:
            raise ValueError(f"the grammar was compiled for a vocabulary of {grammar.vocab_size} ids, this bundle's "
                             f"model has {self.bundle.manifest.model.vocab_size}: compile it with "
                             "GrammarCompiler.for_bundle(runner.bundle)")
        try:
            typed = conversation(messages)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        result = Generation()
        result._stream = self._run(session, typed, config, result)
        return result

    def _plan(self, session: "Session | None", messages: list[Message], config: GenerationConfig) -> _Turn:
        rendered: list[Rendered] = []  # the conversation rendered once, by whichever path needs it first

        def render() -> Rendered:
            if not rendered:
                rendered.append(self._assemble(lambda: self.assembler.render(messages)))
            return rendered[0]

        if session is not None and self._owner is session and session._held is not None:
            turn = self._continuation(session._held, messages, render, config)
            if turn is not None:
                return turn
        media = media_parts(messages)
        prompt, prepared, videos = self._fit(media, lambda videos: self.assembler.draft(render(), media, videos), 0,
                                             config)
        return _Turn(prompt, prepared, videos, 0, prompt.text)

    def _fit(self, media: list, draft: Callable[[list[VideoLayout]], Draft], held: int, config: GenerationConfig
             ) -> tuple[Prompt, list[PreparedImage], list[VideoPlan]]:
        """Plan the videos' frames, choose how each image is tiled (see the module docstring), tile
        the images, and assemble the prompt once: ``draft(video layouts)`` tokenizes it, the images'
        layouts are priced on the draft and laid out last."""
        plans = [self._video_plan(p) for p in media if isinstance(p, VideoPart)]
        images = [p for p in media if isinstance(p, ImagePart)]
        splits = [self._tiling(p) for p in images]
        layouts = [self.images.layout(p, s) for p, s in zip(images, splits)]  # exact or from the header
        drafted = self._assemble(lambda: draft([plan.layout for plan in plans]))
        # The answer's room: all of max_new_tokens, or when the answer may be capped to the room left
        # (the server's requests), a usual answer's: max_tokens is a ceiling, not a wish worth detail.
        room = min(config.max_new_tokens, self.fit_answer_tokens) if config.cap_to_context else config.max_new_tokens
        excess = held + self._assemble(lambda: drafted.length(layouts)) + room - self.bundle.max_context
        flexible = {k for k, p in enumerate(images) if self._detail(p) == "fit" and layouts[k] != UNSPLIT}
        if flexible and excess > 0:
            unsplit = self._assemble(lambda: self.assembler.image_tokens(UNSPLIT))
            savings = [self._assemble(partial(self.assembler.image_tokens, layout)) - unsplit if k in flexible else 0
                       for k, layout in enumerate(layouts)]
            chosen = choose_unsplit(savings, excess)
            for k in flexible if chosen is None else chosen:  # not all unsplit fit: the context check refuses it
                splits[k], layouts[k] = replace(splits[k], split=False), UNSPLIT
        if not held:  # refused from the headers before any tile is made (a held history is replanned instead)
            error = self._over_context(self._assemble(lambda: drafted.length(layouts)), 0, config)
            if error is not None:
                raise error
        # exact layouts: a header may not tell all (image_size)
        prepared = self.images.prepare(images, splits, self._abort.is_set)
        prompt = self._assemble(lambda: drafted.prompt([p.layout for p in prepared]))
        return prompt, prepared, plans

    def _video_plan(self, part: VideoPart) -> VideoPlan:
        if self.videos is None:
            raise InputError("this bundle's model does not take video (only SmolVLM2 checkpoints do): send frames "
                             "as images, or convert a SmolVLM2 checkpoint")
        return self.videos.plan(part)

    def _tiling(self, part: ImagePart) -> Resolution:
        """The part's resolution budget (its own fields, the runner's where it sets none), unsplit for
        detail "low"."""
        resolution, own = self.resolution, part.resolution
        if own is not None:
            resolution = Resolution(own.longest_edge or resolution.longest_edge,
                                    own.max_tiles if own.max_tiles is not None else resolution.max_tiles, own.split)
            try:
                resolution.check(self.bundle.settings.tile_size)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        return replace(resolution, split=False) if self._detail(part) == "low" else resolution

    def _detail(self, part: ImagePart) -> str:
        """The part's detail with "auto" resolved: "high", "low" or "fit"."""
        detail = self.default_detail if part.detail == "auto" else part.detail
        return "fit" if detail == "auto-fit" else detail

    def _continuation(self, held: _Held, messages: list[Message], render: Callable[[], Rendered],
                      config: GenerationConfig) -> _Turn | None:
        n = len(held.signature)
        if (self.llm.history_tokens == 0 or len(messages) < n + 2
                or _signature(messages[:n]) != held.signature):
            return None
        answer = messages[n]
        if answer.role != "assistant" or any(not isinstance(p, TextPart) for p in answer.parts):
            return None
        if answer.joined_text.strip() != held.answer.strip() or len(answer.parts) != 1:
            return None
        rendered = render()
        split = rendered.split_at((n, 0))
        if split is None or not split[0].text.startswith(held.prompt_text):
            return None
        after = split[1]
        if held.stopped:  # the stop token is already in the cache
            after = after.removeprefix(self.assembler.tokens.end_of_utterance)
        parts = media_parts(messages[n + 1:])
        prompt, prepared, videos = self._fit(
            parts, lambda videos: self.assembler.draft(after, parts, videos), self.llm.history_tokens, config)
        return _Turn(prompt, prepared, videos, self.llm.history_tokens, rendered.text)

    def _over_context(self, length: int, held: int, config: GenerationConfig) -> "ContextError | None":
        """The refusal of a prompt of ``length`` tokens after ``held`` kept ones, or None when it fits (an
        answer that may be capped needs one token of room; another all of max_new_tokens)."""
        context = self.bundle.max_context
        if context - length - held < 1:
            return ContextError(f"the prompt is {length} tokens: it fills the context of {context} and leaves no "
                                "room for an answer; send fewer or smaller images, fewer video frames (max_frames) "
                                "or a shorter conversation")
        if not config.cap_to_context and length + held + config.max_new_tokens > context:
            return ContextError(
                f"the prompt is {length} tokens and max_new_tokens is {config.max_new_tokens}: together over the "
                f"context of {context}; send fewer or smaller images, fewer video frames (max_frames), a shorter "
                "conversation or a smaller max_new_tokens")
        return None

    @staticmethod
    def _assemble(build: Callable[[], _T]) -> _T:
        """``build()``, a prompt the assembler refuses being the request's fault (InputError)."""
        try:
            return build()
        except PromptError as exc:
            raise InputError(str(exc)) from exc

    def _run(self, session: "Session | None", messages: list[Message], config: GenerationConfig,
             result: Generation) -> Iterator[str]:
        with self._lock:
            self._abort.clear()
            started = time.perf_counter()
            stats = result.stats
            context = self.bundle.max_context
            try:
                turn = self._plan(session, messages, config)
                if turn.held_tokens + len(turn.prompt) + config.max_new_tokens > context and turn.held_tokens:
                    turn = self._plan(None, messages, config)  # the history does not fit: start over
            except DecodeAborted:  # cancelled while the images were decoded
                result.finish_reason = "abort"
                self._forget()
                return
            error = self._over_context(len(turn.prompt), turn.held_tokens, config)
            if error is not None:
                raise error
            room = context - len(turn.prompt) - turn.held_tokens
            if config.cap_to_context and room < config.max_new_tokens:
                config = replace(config, max_new_tokens=room)  # the answer ends with finish_reason "length"
            if session is not None:
                session._held = None  # invalid until this turn completes
            self._owner = session
            stats.image_tiling = [{"tiles": p.tile_count, "rows": p.layout.rows, "cols": p.layout.cols,
                                   "longest_edge": p.settings.longest_edge if p.settings else None}
                                  for p in turn.images]
            features = self._features(turn, stats)
            if features is None or self._abort.is_set():  # aborted before the prefill
                result.finish_reason = "abort"
                self._forget()
                return
            embeddings = self.assembler.embed(turn.prompt, self.table, features)
            result.prompt_tokens = turn.held_tokens + len(turn.prompt)
            result.reused_tokens = turn.held_tokens
            result.prefill_ids = list(turn.prompt.ids)
            stream = TextStream(self.bundle.tokenizer, config.stop_ids, config.max_new_tokens, config.stop, started)
            result.token_ids = stream.token_ids  # the stream's own list: filled as ids arrive
            tokens = self.llm.generate(embeddings, config, keep_history=turn.held_tokens > 0, stats=stats)
            stopped_early = False
            try:
                for token in tokens:
                    if self._abort.is_set():  # an abort that raced the engine's start
                        self.llm.abort()
                    delta = stream.push(token)
                    if delta:
                        result.text += delta
                        yield delta
                    if stream.cut:  # a stop string: the engine must stop
                        stopped_early = True
                        self.llm.abort()
                        break
            except BaseException:
                self._forget()
                raise
            finally:
                tokens.close()
            tail = stream.close(aborted=self._abort.is_set())
            if tail:
                result.text += tail
                yield tail
            stats.first_token_ms = stream.first_token_ms
            result.finish_reason = stream.finish_reason
            if result.finish_reason == "abort" or stopped_early:
                self._forget()
            elif session is not None:
                eou = self.bundle.tokenizer.token_id(self.assembler.tokens.end_of_utterance)
                session._held = _Held(_signature(messages), turn.full_text, result.text, stream.token_ids[-1:] == [eou])

    def _features(self, turn: _Turn, stats: PerfStats) -> list | None:
        """One feature array per image and per video of the prompt, in prompt order; None if aborted."""
        images = self.images.encode(turn.images, stats, self._abort.is_set)
        if images is None:
            return None
        videos = self.videos.encode(turn.videos, stats, self._abort.is_set) if turn.videos and self.videos else []
        if videos is None:
            return None
        image_features, video_features = iter(images), iter(videos)
        return [next(image_features) if isinstance(chunk, ImageChunk) else next(video_features)
                for chunk in turn.prompt.media]

    def _forget(self) -> None:
        """The KV cache no longer holds a conversation anyone can continue."""
        self.llm.clear_history()
        if self._owner is not None:
            self._owner._held = None
        self._owner = None


class Session:
    """A chat whose turns reuse the engine's KV cache (see the module docstring)."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._held: _Held | None = None

    def generate(self, messages: Sequence[Any], config: GenerationConfig | None = None) -> Generation:
        """Answer the whole conversation ``messages``; only what follows the kept history is prefilled."""
        return self.runner._start(self, messages, config)

    def reset(self) -> None:
        """Forget the conversation (the image-feature cache stays)."""
        self._held = None
        if self.runner._owner is self:
            self.runner._forget()


class RunnerFactory(Protocol):
    """What opens Runners for a part of the board package that must not choose engines itself (the
    server): the caller hands one in (``rksmolvlm.runners.RUNNERS``, or a test's)."""

    def resolve(self, engine: str) -> str:
        """The engine ``engine`` names here (``auto`` → ``npu`` on a board, ``host`` elsewhere); an
        unknown name is an error naming the choices."""
        ...

    def open(self, bundle: RuntimeBundle, engine: str, options: EngineOptions, **settings: Any) -> Runner:
        """A Runner on ``bundle``'s ``engine`` engines started with ``options``; ``settings`` are the
        Runner's keyword arguments."""
        ...


def choose_unsplit(savings: Sequence[int], excess: int) -> set[int] | None:
    """The images to unsplit so the prompt shrinks by at least ``excess`` tokens, ``savings[i]``
    being what unsplitting image i saves (0: it may not be unsplit): the largest savings first, so
    the fewest images lose their split, the earlier image first among equals. An empty set when
    nothing needs saving; None when all of them together do not save enough."""
    chosen: set[int] = set()
    for i in sorted((i for i, s in enumerate(savings) if s > 0), key=lambda i: (-savings[i], i)):
        if excess <= 0:
            break
        chosen.add(i)
        excess -= savings[i]
    return chosen if excess <= 0 else None


def _signature(messages: Sequence[Message]) -> list[tuple]:
    """Messages reduced to what identifies them: roles, texts, image content hashes and details."""
    return [(m.role, tuple(("text", p.text) if isinstance(p, TextPart) else
                           ("image", p.key, p.detail, p.resolution) if isinstance(p, ImagePart) else
                           ("video", p.key, p.fps, p.max_frames) if isinstance(p, VideoPart) else ("other", id(p))
                           for p in m.parts))
            for m in messages]
