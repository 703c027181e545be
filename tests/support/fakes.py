"""Engines that cost nothing, for tests of the wiring: ``FakeVision``, ``FakeLlm``; ``LlmWrapper`` and
``VisionWrapper`` to wrap a real engine (every interface member forwarded: tests subclass them and
change one), and ``RecordingLlm``. Each implements the whole engine interface (runtime/engines.py):
tests/runtime/test_engines.py checks it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np


# -- fake engines ---------------------------------------------------------------------------------
class FakeVision:
    """A vision encoder with the real output shape that costs nothing: tile i's features are its
    mean pixel value plus a ramp, so different tiles and images give different features."""

    def __init__(self, seq: int, hidden: int):
        self.seq, self.hidden = seq, hidden
        self.calls: list[int] = []  # tiles per encode() call (video frames included)
        self.frame_calls: list[int] = []  # frames per encode_frames() call
        self.closed = False

    @classmethod
    def for_bundle(cls, bundle) -> "FakeVision":
        _, seq, hidden = bundle.manifest.vision.output_shape
        return cls(seq, hidden)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        self.calls.append(len(tiles))
        means = tiles.reshape(len(tiles), -1).mean(axis=1, dtype=np.float32) / 255
        ramp = np.linspace(-1, 1, self.seq * self.hidden, dtype=np.float32).reshape(self.seq, self.hidden)
        return means[:, None, None] + ramp[None]

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        self.frame_calls.append(len(frames))
        return self.encode(frames)

    @property
    def tiles(self) -> int:
        return sum(self.calls)

    def close(self) -> None:
        self.closed = True


@dataclass
class Prefill:
    """One generate() call as the fake LLM saw it."""

    embeddings: np.ndarray
    keep_history: bool
    history_before: int


class FakeLlm:
    """An LLM engine that records the embeddings it was given and yields ``script`` (a list of
    ids, settable between requests) until a stop id (yielded too), ``max_new_tokens``, the end of
    the script or an abort. Like the real engines its history counts the prefill and every
    generated token.

    With a grammar (``config.grammar``) it follows it as the real engines do (runtime/structured's
    Guide: forced runs, one pick per step, the first stop id once the grammar is complete, counted
    against max_new_tokens): at position i it picks ``script[i]`` when the grammar allows it, else
    the lowest id the grammar allows."""

    def __init__(self, script: Sequence[int] = ()):
        self.script = list(script)
        self.prefills: list[Prefill] = []
        self.yielded: list[list[int]] = []  # the ids each generate() call yielded
        self.aborts = 0
        self.clears = 0
        self.closed = False
        self._history = 0
        self._abort = threading.Event()

    @property
    def history_tokens(self) -> int:
        return self._history

    def embedding_table(self) -> np.ndarray | None:
        return None

    def generate(self, embeddings, config, keep_history, stats):
        self._abort.clear()
        if not keep_history:
            self._history = 0
        self.prefills.append(Prefill(np.array(embeddings, copy=True), keep_history, self._history))
        self._history += len(embeddings)
        stats.prefill_tokens += len(embeddings)
        out: list[int] = []
        self.yielded.append(out)
        if config.grammar is not None:
            yield from self._structured(config, out, stats)
            return
        for token in self.script[:config.max_new_tokens]:
            if self._abort.is_set():
                return
            out.append(token)
            self._history += 1
            stats.generate_tokens += 1
            yield token
            if token in config.stop_ids:
                return

    def _structured(self, config, out: list[int], stats):
        from rksmolvlm.runtime.engines import GenerationConfig
        from rksmolvlm.runtime.structured import Guide

        grammar = config.grammar
        stop_ids = config.stop_ids or grammar.stop_ids
        guide = Guide(GenerationConfig(), grammar.constraint())  # greedy over the fake's preferences
        run = guide.begin()
        while True:
            if guide.done and not (run and run[-1] in stop_ids):
                run = [*run, stop_ids[0]]
            for token in run[:config.max_new_tokens - len(out)]:
                if self._abort.is_set():
                    return
                out.append(token)
                self._history += 1
                stats.generate_tokens += 1
                yield token
            if len(out) >= config.max_new_tokens or (run and run[-1] in stop_ids):
                return
            # preferences: the script's id at this position first, then lower ids before higher ones
            logits = -np.arange(grammar.vocab_size, dtype=np.float32)
            if len(out) < len(self.script) and 0 <= self.script[len(out)] < grammar.vocab_size:
                logits[self.script[len(out)]] = 1.0
            run = guide.step(logits)

    def abort(self) -> None:
        self.aborts += 1
        self._abort.set()

    def clear_history(self) -> None:
        self.clears += 1
        self._history = 0

    def close(self) -> None:
        self.closed = True


def fake_runner(bundle, script: Sequence[int] = (), **kwargs):
    """A Runner on ``bundle`` with a FakeVision and a FakeLlm(script)."""
    from rksmolvlm.runtime.runner import Runner

    return Runner(bundle, FakeVision.for_bundle(bundle), FakeLlm(script), **kwargs)


class VisionWrapper:
    """A vision encoder around ``inner``, forwarding every member of the interface."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self.inner.encode(tiles)

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        return self.inner.encode_frames(frames)

    def close(self) -> None:
        self.inner.close()


class LlmWrapper:
    """An LLM engine around ``llm``, forwarding every member of the interface."""

    def __init__(self, llm):
        self.llm = llm

    def generate(self, embeddings, config, keep_history, stats):
        return self.llm.generate(embeddings, config, keep_history, stats)

    def abort(self) -> None:
        self.llm.abort()

    def clear_history(self) -> None:
        self.llm.clear_history()

    @property
    def history_tokens(self) -> int:
        return self.llm.history_tokens

    def embedding_table(self) -> np.ndarray | None:
        return self.llm.embedding_table()

    def close(self) -> None:
        self.llm.close()


class RecordingLlm(LlmWrapper):
    """The real engine, recording the GenerationConfig of every generation and slowed down per
    token when asked (so that requests overlap)."""

    def __init__(self, llm):
        super().__init__(llm)
        self.configs: list = []  # GenerationConfig of each generation
        self.delay = 0.0

    def generate(self, embeddings, config, keep_history, stats):
        self.configs.append(config)
        for token in self.llm.generate(embeddings, config, keep_history, stats):
            if self.delay:
                time.sleep(self.delay)
            yield token


class UnusedRunner:
    """A runner for a server whose requests are all refused before they queue."""

    def generate(self, messages, config):
        raise AssertionError("this request should have been refused before the queue")

    def abort(self):
        pass

    def close(self):
        pass
