"""The two engine interfaces the pipeline is wired from, and the records they share.

A vision encoder turns uint8 NHWC tiles into image features; an LLM engine turns input embeddings
into a stream of token ids, keeps or clears its history (KV cache), can be aborted from another
thread and reports what it measured. NPU engines (RKNNLite, librkllmrt) and host-preview engines
(onnxruntime, torch), the simulator's tower (rknn-toolkit2) and the tests' fakes implement every
member of these interfaces, so one pipeline and one test suite serve them all. Which engines a
caller gets is chosen outside the board package, by ``rksmolvlm.runners``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Generator, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from rksmolvlm.runtime.structured.grammar import Grammar

__all__ = ["VisionEncoder", "LlmEngine", "GenerationConfig", "PerfStats", "EngineOptions"]


@dataclass(frozen=True)
class GenerationConfig:
    """All generation options in one place. ``temperature == 0`` (or below 1e-5) means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # the runner fills in the bundle's end ids
    stop: tuple[str, ...] = ()  # stop strings: the text stream cuts the answer before the first one
    # OpenAI's penalties over the generated tokens: logit -= count × frequency + (count > 0) × presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    cap_to_context: bool = False  # the runner lowers max_new_tokens to the room the prompt leaves (else ContextError)
    # Structured output (runtime/structured): the compiled grammar the answer must follow, None for free text.
    # The engine starts a fresh Constraint from it per generation and ends the answer with a stop id once the
    # grammar is complete; free-text generation is unchanged.
    grammar: Grammar | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be ≥ 0")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be ≥ 0")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 count as 0: dividing logits by 1e-300 would overflow to inf."""
        return self.temperature < 1e-5


@dataclass
class PerfStats:
    """What one request measured (milliseconds); engines fill their part, the pipeline the rest."""

    vision_tiles: int = 0
    vision_ms: float = 0.0
    vision_cached_images: int = 0  # images whose features came from the cache
    video_cached_frames: int = 0  # video frames whose features came from the cache
    video_frames: int = 0  # video frames decoded and encoded (of vision_tiles)
    video_decode_ms: float = 0.0  # decoding and resizing them
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
    """Images and video frames → features, order kept: uint8 (N, T, T, 3) → float32 (N, image_seq_len,
    text_hidden)."""

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """Image tiles (the processor's crops and global image)."""
        ...

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """Video frames (unsplit tiles), normalised as transformers' video processor does (an engine
        whose model bakes the normalisation in treats them as tiles)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LlmEngine(Protocol):
    """Embeddings in, token ids out, with a KV cache that can be kept across turns."""

    def generate(self, embeddings: np.ndarray, config: GenerationConfig, keep_history: bool,
                 stats: PerfStats) -> Generator[int, None, None]:
        """Prefill ``embeddings`` (float32, (n, hidden)) after the kept history (or from scratch when
        ``keep_history`` is false), then yield generated token ids until a stop id (yielded too),
        ``max_new_tokens`` or abort. Closing the generator early stops the engine."""
        ...

    def abort(self) -> None:
        """Stop the running generation soon (callable from another thread)."""
        ...

    def clear_history(self) -> None: ...

    @property
    def history_tokens(self) -> int:
        """Tokens held in the KV cache."""
        ...

    def embedding_table(self) -> np.ndarray | None:
        """The engine's own token embeddings when it has better ones than the bundle's float16
        table (the host preview's float32 weights); None otherwise."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """How to start the engines: CPU threads (host), librkllmrt path and NPU cores (board), and
    the largest max_new_tokens a request may ask for (librkllmrt 1.2.x fixes it at start-up)."""

    threads: int | None = None
    library: str | None = None
    cores: tuple[int, ...] | None = None
    max_new_tokens: int = 256
