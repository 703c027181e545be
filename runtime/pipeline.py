"""The pipeline: chat messages with images → streamed answer. It only wires the parts:
preprocessing, prompt rendering, the image-feature cache, the embedding splice and the two engines.

Multi-turn: the engine keeps its KV cache; the pipeline remembers the (unexpanded) prompt text and
images the cache holds, and for a new turn sends only the new suffix — the previous answer's end,
the new user message and any new images. When the conversation does not extend what the cache holds
(edited history, other images, a different chat), it starts over from an empty cache.
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

from ..errors import RkSmolVLMError
from .embed import EmbeddingTable, splice
from .engines import GenerationConfig, LlmEngine, PerfStats, VisionEncoder
from .loader import RuntimeBundle
from .preprocess import DEFAULT_MAX_PIXELS, load_image, tile_image

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
    prompt_tokens: int = 0
    reused_tokens: int = 0
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
        self._history_text: str | None = None
        self._history_images: list[str] = []
        self._lock = threading.Lock()

    # -- parts --------------------------------------------------------------------------------
    def _encode_images(self, images: list[_Image], stats: PerfStats) -> np.ndarray | None:
        if not images:
            return None
        out = []
        for image in images:
            if image.tiles is None:
                self._features.move_to_end(image.key)
                stats.vision_cached_images += 1
                out.append(self._features[image.key][0])
                continue
            start = time.perf_counter()
            features = self.vision.encode(image.tiles)
            stats.vision_ms += (time.perf_counter() - start) * 1000
            stats.vision_tiles += len(image.tiles)
            self._features[image.key] = (features, image.rows, image.cols)
            if len(self._features) > self._cache_size:
                self._features.popitem(last=False)
            out.append(features)
        return np.concatenate(out, axis=0)

    def reset(self) -> None:
        """Forget the conversation (the image-feature cache stays)."""
        self.llm.clear_history()
        self._history_text, self._history_images = None, []

    def abort(self) -> None:
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

    def _prepare(self, messages, keep_history: bool, stats: PerfStats):
        prompts = self.bundle.prompts
        full_text = prompts.render(messages)
        images = []
        for source in image_parts(messages):
            images.append(_Image(hashlib.sha256(_image_bytes(source)).hexdigest(), source))
        keys = [i.key for i in images]
        reuse = (keep_history and self._history_text is not None and full_text.startswith(self._history_text)
                 and keys[:len(self._history_images)] == self._history_images
                 and self.llm.history_tokens > 0)
        suffix = full_text[len(self._history_text):] if reuse else full_text
        new_images = images[len(self._history_images):] if reuse else images
        for image in new_images:
            if image.key in self._features:  # cached: no decoding, no tiling, no vision pass
                _, image.rows, image.cols = self._features[image.key]
            else:
                tiled = tile_image(load_image(image.source, self.max_pixels), self.bundle.settings)
                image.tiles, image.rows, image.cols = tiled.tiles, tiled.rows, tiled.cols
        text = prompts.expand(suffix, [(i.rows, i.cols) for i in new_images])
        ids = prompts.encode(text)
        return reuse, full_text, keys, new_images, ids

    def _run(self, messages, config: GenerationConfig, keep_history: bool, result: Generation) -> Iterator[str]:
        with self._lock:
            start = time.perf_counter()
            stats = result.stats
            reuse, full_text, keys, new_images, ids = self._prepare(messages, keep_history, stats)
            held = self.llm.history_tokens if reuse else 0
            if held + len(ids) + config.max_new_tokens > self.bundle.max_context:
                if reuse:  # the history is what does not fit: start over with the whole conversation
                    self.reset()
                    reuse, full_text, keys, new_images, ids = self._prepare(messages, False, stats)
                    held = 0
                if len(ids) + config.max_new_tokens > self.bundle.max_context:
                    raise ContextError(
                        f"the prompt is {len(ids)} tokens and max_new_tokens is {config.max_new_tokens}: together "
                        f"over the context of {self.bundle.max_context}; send fewer or smaller images, a shorter "
                        "conversation or a smaller max_new_tokens")
            features = self._encode_images(new_images, stats)
            embeddings = splice(self.table.lookup(ids), ids, self.bundle.image_id, features)
            result.prompt_tokens = held + len(ids)
            result.reused_tokens = held
            decoder = _IncrementalDecoder(self.bundle.prompts)
            self._history_text = None  # invalid until this turn completes
            try:
                for token in self.llm.generate(embeddings, config, keep_history=reuse, stats=stats):
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
            else:
                result.finish_reason = "abort"
            if result.finish_reason == "abort":
                self.reset()
            else:
                self._history_text = full_text + self.bundle.prompts.decode(result.token_ids, skip_special_tokens=False)
                self._history_images = keys

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
