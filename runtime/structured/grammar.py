"""Grammars over one bundle's tokenizer: the llguidance tokenizer is built once per bundle, each
distinct ResponseFormat is compiled once (a bounded LRU of ready matchers) and every request gets a
fresh ``Constraint`` copied from it. Compiling runs under llguidance's own limits and is probed with
a first mask, so an untrusted schema that is too costly fails here with a typed error, not mid-answer."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rksmolvlm.runtime.structured.constraint import Constraint
from rksmolvlm.runtime.structured.errors import (
    InvalidSchemaError,
    SchemaTooComplexError,
    UnsupportedSchemaError,
)
from rksmolvlm.runtime.structured.formats import ResponseFormat

__all__ = ["CompileLimits", "Grammar", "GrammarCompiler", "JSON_LAYOUT"]

# How the grammar lays JSON out: Python's json.dumps style, no free whitespace. A small model
# allowed free whitespace can loop on newlines until max_tokens; fixed separators are also forced
# tokens, fed without sampling. Applied as overrides, so a client's "x-guidance" cannot turn on
# lenient mode (unimplemented keywords ignored) or oneOf-as-anyOf.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False,
               "coerce_one_of": False}


@dataclass(frozen=True)
class CompileLimits:
    """llguidance's parser limits for untrusted grammars (its defaults are sized for trusted ones)."""

    initial_lexer_fuel: int = 200_000  # regex work when building the lexer (~50k/ms): about 4 ms
    step_lexer_fuel: int = 200_000  # regex work in one mask step (~14k/ms)
    step_max_items: int = 50_000  # Earley items in one mask step
    max_lexer_states: int = 50_000  # lexer states (about 1–2 kB each)
    max_grammar_size: int = 200_000  # symbols in the grammar's productions
    probe_seconds: float = 2.0  # a compile plus first mask slower than this is refused (and not cached)


class Grammar:
    """One compiled ResponseFormat: a ready matcher that each request copies."""

    def __init__(self, fmt: ResponseFormat, matcher: Any, vocab_size: int, stop_ids: tuple[int, ...]):
        self.format = fmt
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._lock = threading.Lock()  # the template is shared by every request of this format

    def constraint(self) -> Constraint:
        """A fresh per-request state at the start of the answer."""
        with self._lock:
            copy = self._matcher.deep_copy()
        return Constraint(copy, self.vocab_size, self.stop_ids)


class GrammarCompiler:
    """Compiles ResponseFormats against one bundle's tokenizer. Thread-safe; ``cache_size`` distinct
    formats are kept (least recently used dropped)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: Sequence[int], *, cache_size: int = 32,
                 limits: CompileLimits = CompileLimits()):
        import llguidance

        if not stop_ids:
            raise ValueError("stop_ids is empty: the grammar needs the model's end-of-answer id(s)")
        self._llg = llguidance
        self.vocab_size = vocab_size
        self.stop_ids = tuple(int(i) for i in stop_ids)
        # n_vocab: the model's logits may be wider than the tokenizer (padded rows): those ids are never allowed.
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(self.stop_ids))
        if self.tokenizer.vocab_size != vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids, the model {vocab_size}")
        self.limits = limits
        self._parser_limits = llguidance.LLParserLimits(
            initial_lexer_fuel=limits.initial_lexer_fuel, step_lexer_fuel=limits.step_lexer_fuel,
            step_max_items=limits.step_max_items, max_lexer_states=limits.max_lexer_states,
            max_grammar_size=limits.max_grammar_size, verbose_errors=False)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_file(cls, tokenizer_path: str | Path, vocab_size: int, stop_ids: Sequence[int],
                  **kwargs: Any) -> GrammarCompiler:
        return cls(Path(tokenizer_path).read_text(encoding="utf-8"), vocab_size, stop_ids, **kwargs)

    @classmethod
    def for_bundle(cls, bundle: Any, **kwargs: Any) -> GrammarCompiler:
        """From a RuntimeBundle: its tokenizer.json, the model's vocabulary (the width of its logits)
        and its end ids."""
        manifest = bundle.manifest
        return cls.from_file(bundle.file(manifest.tokenizer), manifest.model.vocab_size, bundle.stop_ids, **kwargs)

    def compile(self, fmt: ResponseFormat) -> Grammar | None:
        """The grammar of ``fmt`` (None for free text), from the cache when an equal format was compiled."""
        if not fmt.constrained:
            return None
        key = fmt.key
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return grammar
            self.misses += 1
        grammar = self._build(fmt)  # outside the lock: llguidance drops the GIL while it compiles
        with self._lock:
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def constraint(self, fmt: ResponseFormat) -> Constraint | None:
        """A fresh per-request constraint for ``fmt`` (None for free text)."""
        grammar = self.compile(fmt)
        return None if grammar is None else grammar.constraint()

    def _build(self, fmt: ResponseFormat) -> Grammar:
        llg = self._llg
        started = time.perf_counter()
        try:
            source = llg.LLMatcher.grammar_from_json_schema(fmt.schema_json, overrides=JSON_LAYOUT)
        except ValueError as exc:
            if "recursion limit" in str(exc):  # serde_json's nesting limit
                raise SchemaTooComplexError(f"{fmt.param} is nested too deep to compile: flatten the schema",
                                            param=fmt.param, limit="llguidance") from exc
            raise InvalidSchemaError(f"{fmt.param} is not a valid schema: {exc}", param=fmt.param) from exc
        matcher = llg.LLMatcher(self.tokenizer, source, log_level=0, limits=self._parser_limits)
        if not matcher.is_error():
            # the lexer is built lazily: masks at the start and past the forced run (into the first
            # value) make a costly regex fail here rather than mid-answer
            probe = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
            matcher.unsafe_compute_mask_ptr(probe.ctypes.data, probe.nbytes)
            ahead = matcher.deep_copy()
            forced = ahead.compute_ff_tokens()
            if forced and ahead.consume_tokens(forced):
                ahead.unsafe_compute_mask_ptr(probe.ctypes.data, probe.nbytes)
            if ahead.is_error():
                raise _compile_error(ahead.get_error(), fmt.param)
        if matcher.is_error():
            raise _compile_error(matcher.get_error(), fmt.param)
        elapsed = time.perf_counter() - started
        if elapsed > self.limits.probe_seconds:
            raise SchemaTooComplexError(f"{fmt.param} took {elapsed:.1f} s to compile, over the limit of "
                                        f"{self.limits.probe_seconds} s: send a simpler schema", param=fmt.param,
                                        limit="probe_seconds")
        return Grammar(fmt, matcher, self.vocab_size, self.stop_ids)


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[([^\]]*)\]')
_TOO_COMPLEX = ("too many", "fuel", "limit", "too complex", "too large", "too big", "exceeded")


def _compile_error(message: str, param: str) -> Exception:
    """llguidance's compile error as one of ours, naming the keyword where it names one."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    if m := _UNIMPLEMENTED.search(message):
        keyword = m.group(1).split(",")[0].strip().strip('"')
        return UnsupportedSchemaError(f"schema keyword '{keyword}' in {param} cannot be enforced while decoding: "
                                      "remove it", param=param, keyword=keyword)
    if "oneOf" in message:
        return UnsupportedSchemaError(f"schema keyword 'oneOf' in {param} cannot be enforced while decoding: use "
                                      "anyOf", param=param, keyword="oneOf")
    if "Unknown format" in message:
        return UnsupportedSchemaError(f"{param}: {first}; remove 'format' or use one of date-time, date, time, "
                                      "email, uri, uuid, ipv4, ipv6, hostname", param=param, keyword="format")
    if any(word in first.lower() for word in _TOO_COMPLEX):
        return SchemaTooComplexError(f"{param} is too complex to compile ({first}): send a simpler schema",
                                     param=param, limit="llguidance")
    return InvalidSchemaError(f"{param} cannot be compiled: {first}", param=param)
