"""The pipeline: chat messages with images → streamed answer. It only wires the parts:
preprocessing, prompt rendering, the image-feature cache, the embedding splice and the two engines.

Multi-turn: the engine keeps its KV cache, which holds the previous prompt and the model's own
generated tokens. When a request repeats the previous messages, then the assistant answer this
pipeline generated, then new messages, only the new part is rendered, tokenized, encoded and
prefilled: the template text after the answer (its end-of-utterance, the new user turn, the
generation prompt) and the new images. Anything else (edited history, other images, another chat)
starts over from an empty cache.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rksmolvlm.errors import RkSmolVLMError
from rksmolvlm.processing.embed import EmbeddingTable, splice
from rksmolvlm.runtime.engines import GenerationConfig, LlmEngine, PerfStats, VisionEncoder
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.processing.image import DEFAULT_MAX_PIXELS, load_image, tile_image

__all__ = ["Pipeline", "Generation", "ContextError", "image_parts"]


class ContextError(RkSmolVLMError):
    """The prompt plus max_new_tokens does not fit the model's context."""


def image_parts(messages: Sequence[dict]) -> list:
    """The image sources of every image part, in prompt order (``{"type": "image", "image": src}``)."""
    sources = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image", "image_url", "input_image"):
                    if "image" not in part:
                        raise ValueError("an image part needs its decoded source under 'image' "
                                         "(a path, bytes or PIL image)")
                    sources.append(part["image"])
    return sources


def _image_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    buffer = io.BytesIO()  # a PIL image: hash its pixels
    source.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class _Image:
    key: str
    source: object
    rows: int = 0
    cols: int = 0
    tiles: np.ndarray | None = None  # None when the features are cached


@dataclass
class Generation:
    """One answer: iterate for text deltas; afterwards the fields hold the result."""

    _stream: Iterator[str]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0  # the whole context before generation (reused + prefilled)
    reused_tokens: int = 0  # of which already in the engine's KV cache
    prefill_ids: list[int] = field(default_factory=list)  # the ids prefilled for this turn
    stats: PerfStats = field(default_factory=PerfStats)

    def __iter__(self) -> Iterator[str]:
        return self._stream

    def consume(self) -> "Generation":
        for _ in self:
            pass
        return self


class Pipeline:
    """One bundle, one vision encoder, one LLM engine; one request at a time (a lock guards it)."""

    def __init__(self, bundle: RuntimeBundle, vision: VisionEncoder, llm: LlmEngine, image_cache_size: int = 32,
                 max_pixels: int = DEFAULT_MAX_PIXELS, table: EmbeddingTable | None = None):
        self.bundle = bundle
        self.vision = vision
        self.llm = llm
        self.max_pixels = max_pixels
        host_table = getattr(llm, "embedding_table", None)
        if table is None:
            table = EmbeddingTable.from_array(host_table()) if callable(host_table) else bundle.embedding_table()
        self.table = table
        self._features: OrderedDict[str, tuple[np.ndarray, int, int]] = OrderedDict()  # key → features, rows, cols
        self._cache_size = image_cache_size
        self._history: _History | None = None
        self._lock = threading.Lock()
        self._abort = threading.Event()  # set by abort(); checked between stages, not only while decoding

    # -- parts --------------------------------------------------------------------------------
    def _encode_images(self, images: list[_Image], stats: PerfStats) -> np.ndarray | None:
        if not images:
            return None
        out, local = [], {}
        for image in images:
            if self._abort.is_set():
                return None
            features = local.get(image.key)
            if features is None and image.key in self._features:
                self._features.move_to_end(image.key)
                features = self._features[image.key][0]
            if features is not None:  # cached earlier, or earlier in this same request
                stats.vision_cached_images += 1
            else:
                start = time.perf_counter()
                features = self.vision.encode(image.tiles)
                stats.vision_ms += (time.perf_counter() - start) * 1000
                stats.vision_tiles += len(image.tiles)
                self._features[image.key] = (features, image.rows, image.cols)
                if len(self._features) > self._cache_size:
                    self._features.popitem(last=False)
            local[image.key] = features
            out.append(features)
        return np.concatenate(out, axis=0)

    def reset(self) -> None:
        """Forget the conversation (the image-feature cache stays)."""
        self.llm.clear_history()
        self._history = None

    def abort(self) -> None:
        """Stop the running request as soon as possible: between images, before the prefill, or
        during decoding (callable from another thread)."""
        self._abort.set()
        self.llm.abort()

    # -- requests -----------------------------------------------------------------------------
    def generate(self, messages: Sequence[dict], config: GenerationConfig | None = None,
                 keep_history: bool = True) -> Generation:
        """Start answering ``messages`` (OpenAI-style parts; image parts carry ``image``). With
        ``keep_history`` the KV cache is reused when the messages extend the previous turn."""
        config = config or GenerationConfig()
        if not config.stop_ids:
            config = GenerationConfig(**{**config.__dict__, "stop_ids": self.bundle.stop_ids})
        generation = Generation(iter(()))
        generation._stream = self._run(messages, config, keep_history, generation)
        return generation

    def _continuation(self, messages, signature) -> tuple[str, int] | None:
        """(text to prefill, number of images already in the cache) when ``messages`` continue the
        cached conversation with the answer this pipeline generated; None otherwise."""
        h = self._history
        n = len(h.signature)
        if (self.llm.history_tokens == 0 or len(signature) < n + 2 or signature[:n] != h.signature
                or signature[n][0] != "assistant"):
            return None
        answer = "".join(value for kind, value in signature[n][1] if kind == "text")
        if answer.strip() != h.answer.strip() or any(kind == "image" for kind, _ in signature[n][1]):
            return None
        marked = [dict(m) for m in messages]
        marked[n] = {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_MARK}]}
        before, _, after = self.bundle.prompts.render(marked).partition(_ANSWER_MARK)
        if not before.startswith(h.prompt_text):
            return None
        eou = self.bundle.prompts.tokens.end_of_utterance
        if h.stopped and after.startswith(eou):  # the stop token is already in the cache
            after = after[len(eou):]
        return after, h.images

    def _prepare(self, messages, keep_history: bool, stats: PerfStats):
        prompts = self.bundle.prompts
        images = []
        for source in image_parts(messages):
            images.append(_Image(hashlib.sha256(_image_bytes(source)).hexdigest(), source))
        keys = iter([i.key for i in images])
        signature = _signature(messages, keys)
        found = self._continuation(messages, signature) if keep_history and self._history else None
        reuse = found is not None
        full_text = prompts.render(messages)
        suffix, held_images = found if reuse else (full_text, 0)
        new_images = images[held_images:]
        seen: dict[str, _Image] = {}
        for image in new_images:
            if image.key in self._features:  # cached: no decoding, no tiling, no vision pass
                _, image.rows, image.cols = self._features[image.key]
            elif image.key in seen:  # the same image twice in one request
                image.rows, image.cols = seen[image.key].rows, seen[image.key].cols
            else:
                seen[image.key] = image
                tiled = tile_image(load_image(image.source, self.max_pixels), self.bundle.settings)
                image.tiles, image.rows, image.cols = tiled.tiles, tiled.rows, tiled.cols
        text = prompts.expand(suffix, [(i.rows, i.cols) for i in new_images])
        ids = prompts.encode(text)
        return reuse, full_text, signature, new_images, ids

    def _run(self, messages, config: GenerationConfig, keep_history: bool, result: Generation) -> Iterator[str]:
        with self._lock:
            self._abort.clear()
            start = time.perf_counter()
            stats = result.stats
            reuse, full_text, signature, new_images, ids = self._prepare(messages, keep_history, stats)
            held = self.llm.history_tokens if reuse else 0
            if held + len(ids) + config.max_new_tokens > self.bundle.max_context:
                if reuse:  # the history is what does not fit: start over with the whole conversation
                    self.reset()
                    reuse, full_text, signature, new_images, ids = self._prepare(messages, False, stats)
                    held = 0
                if len(ids) + config.max_new_tokens > self.bundle.max_context:
                    raise ContextError(
                        f"the prompt is {len(ids)} tokens and max_new_tokens is {config.max_new_tokens}: together "
                        f"over the context of {self.bundle.max_context}; send fewer or smaller images, a shorter "
                        "conversation or a smaller max_new_tokens")
            features = self._encode_images(new_images, stats)
            if self._abort.is_set():  # aborted while images were decoded or encoded: no prefill
                result.finish_reason = "abort"
                self.reset()
                return
            embeddings = splice(self.table.lookup(ids), ids, self.bundle.image_id, features)
            result.prompt_tokens = held + len(ids)
            result.prefill_ids = ids
            result.reused_tokens = held
            decoder = _IncrementalDecoder(self.bundle.prompts)
            held_images = (self._history.images if reuse else 0) + len(new_images)
            self._history = None  # invalid until this turn completes
            try:
                for token in self.llm.generate(embeddings, config, keep_history=reuse, stats=stats):
                    if self._abort.is_set():  # an abort that raced the engine's start
                        self.llm.abort()
                    if not result.token_ids:
                        stats.first_token_ms = (time.perf_counter() - start) * 1000
                    result.token_ids.append(token)
                    delta = decoder.push(token, final=token in config.stop_ids)
                    if delta:
                        result.text += delta
                        yield delta
            except BaseException:
                self.reset()
                raise
            tail = decoder.flush()
            if tail:
                result.text += tail
                yield tail
            last = result.token_ids[-1] if result.token_ids else None
            if last is not None and last in config.stop_ids:
                result.finish_reason = "stop"
            elif len(result.token_ids) >= config.max_new_tokens:
                result.finish_reason = "length"
            else:  # the engine knows whether it ended on its own (e.g. librkllmrt's own end token)
                result.finish_reason = getattr(self.llm, "last_finish", None) or "abort"
            if result.finish_reason == "abort":
                self.reset()
            else:
                self._history = _History(signature, full_text, result.text, result.finish_reason == "stop",
                                         held_images)

_ANSWER_MARK = "\x00rksmolvlm-answer\x00"


@dataclass
class _History:
    """What the engine's KV cache holds: the conversation up to the last request, rendered as
    ``prompt_text``, plus the model's ``answer`` (ended by a stop token when ``stopped``)."""

    signature: list
    prompt_text: str
    answer: str
    stopped: bool
    images: int


def _signature(messages, keys) -> list:
    """Messages reduced to what identifies them: roles, texts, and image content hashes."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            items = [("text", content)]
        else:
            items = [("text", str(p.get("text", ""))) if p.get("type") == "text" else ("image", next(keys))
                     for p in content or []]
        out.append((message.get("role"), items))
    return out


class _IncrementalDecoder:
    """Token ids → text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, prompts):
        self.prompts = prompts
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int, final: bool = False) -> str:
        self.ids.append(token)
        text = self.prompts.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        text = self.prompts.decode(self.ids, skip_special_tokens=True)
        delta, self.sent = text[len(self.sent):], text
        return delta
