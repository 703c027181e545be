"""The two engine interfaces the pipeline is wired from, and the records they share.

A vision encoder turns uint8 NHWC tiles into image features; an LLM engine turns input embeddings
into a stream of token ids, keeps or clears its history (KV cache), can be aborted from another
thread and reports what it measured. NPU engines (RKNNLite, librkllmrt) and host-preview engines
(onnxruntime, torch) implement the same interfaces, so one pipeline and one test suite serve both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

__all__ = ["VisionEncoder", "LlmEngine", "GenerationConfig", "PerfStats"]


@dataclass(frozen=True)
class GenerationConfig:
    """All generation options in one place. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be ≥ 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be ≥ 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class PerfStats:
    """What one request measured (milliseconds); engines fill their part, the pipeline the rest."""

    vision_tiles: int = 0
    vision_ms: float = 0.0
    vision_cached_images: int = 0
    prefill_tokens: int = 0
    prefill_ms: float = 0.0
    generate_tokens: int = 0
    generate_ms: float = 0.0
    first_token_ms: float = 0.0  # from request start to the first generated token
    engine: dict = field(default_factory=dict)  # the engine's own counters (e.g. RKLLMPerfStat)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens / (self.prefill_ms / 1000) if self.prefill_ms else None
        d["decode_tokens_per_s"] = (self.generate_tokens - 1) / (self.generate_ms / 1000) \
            if self.generate_ms and self.generate_tokens > 1 else None
        return d


@runtime_checkable
class VisionEncoder(Protocol):
    """uint8 (N, T, T, 3) tiles → float32 (N, image_seq_len, text_hidden) features, tile order kept."""

    def encode(self, tiles: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


@runtime_checkable
class LlmEngine(Protocol):
    """Embeddings in, token ids out, with a KV cache that can be kept across turns."""

    def generate(self, embeddings: np.ndarray, config: GenerationConfig, keep_history: bool,
                 stats: PerfStats) -> Iterator[int]:
        """Prefill ``embeddings`` (float32, (n, hidden)) after the kept history (or from scratch when
        ``keep_history`` is false), then yield generated token ids until a stop id (yielded too),
        ``max_new_tokens`` or abort."""
        ...

    def abort(self) -> None:
        """Stop the running generation soon (callable from another thread)."""
        ...

    def clear_history(self) -> None: ...

    @property
    def history_tokens(self) -> int:
        """Tokens held in the KV cache."""
        ...

    def close(self) -> None: ...
