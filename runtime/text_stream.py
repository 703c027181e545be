"""Generated token ids → the answer's text, decided in one place for ``ask``, ``chat`` and the server.

The stream owns: stop ids (the token is kept in ``token_ids``, never shown), stop strings (the text
is cut before the first one; text that may still become one is held back), incremental UTF-8-safe
detokenization (each token decodes only a short window of ids: linear in the answer's length), the
one space the model writes after "Assistant:" (dropped, so the answer renders back into the same
prompt), the finish reason and the first-token time.
"""

from __future__ import annotations

import time
from typing import Collection, Sequence

from rksmolvlm.processing.prompt import TextTokenizer

__all__ = ["TextStream", "Detokenizer", "assistant_content"]


def assistant_content(generated: str) -> str:
    """A generated text as an assistant message's content: the template writes "Assistant: " +
    content while the model generates after "Assistant:", so one leading space is dropped."""
    return generated[1:] if generated.startswith(" ") else generated


class Detokenizer:
    """Token ids → text deltas. Decodes ids from the last emitted boundary only, and holds back a
    delta that ends in an incomplete UTF-8 sequence until the next id completes it."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this are already emitted
        self._prefix_text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") and not final:  # an incomplete character: wait for its next byte
            return ""
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        return delta


class TextStream:
    """One answer's token ids in, its visible text deltas out."""

    def __init__(self, tokenizer: TextTokenizer, stop_ids: Collection[int], max_new_tokens: int,
                 stop_strings: Sequence[str] = (), started: float | None = None):
        self.stop_ids = frozenset(stop_ids)
        self.stops = tuple(s for s in stop_strings if s)
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.first_token_ms: float = 0.0
        self._started = time.perf_counter() if started is None else started
        self._detokenizer = Detokenizer(tokenizer)
        self._longest = max(map(len, self.stops), default=0)
        self._shown: list[str] = []
        self._pending = ""  # decoded, not shown yet: it may be the start of a stop string
        self._leading = True  # the first text has not been seen yet
        self.cut = False  # a stop string ended the answer (the engine must be stopped)

    @property
    def done(self) -> bool:
        """A stop id or stop string ended the answer: feed no more ids."""
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self._shown)

    def push(self, token: int) -> str:
        """One generated id → the text to show now (maybe empty)."""
        if self.done:
            return ""
        if not self.token_ids:
            self.first_token_ms = (time.perf_counter() - self._started) * 1000
        self.token_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._show(self._add(self._detokenizer.flush()), hold=False)
        return self._show(self._add(self._detokenizer.push(token)), hold=True)

    def close(self, aborted: bool = False) -> str:
        """The engine stopped: the last text and the finish reason (stop, length or abort)."""
        if self.done:
            return ""
        tail = self._show(self._add(self._detokenizer.flush()), hold=False)
        if self.done:  # the flushed text held a stop string
            return tail
        if aborted:
            self.finish_reason = "abort"
        elif len(self.token_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        else:  # the engine ended on its own end token
            self.finish_reason = "stop"
        return tail

    # -- private ---------------------------------------------------------------------------------
    def _add(self, delta: str) -> str:
        if self._leading and delta:
            self._leading = False
            delta = assistant_content(delta)
        return delta

    def _show(self, delta: str, hold: bool) -> str:
        pending = self._pending + delta
        if self.stops:
            found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
            if found:
                self.finish_reason, self.cut = "stop", True
                pending, hold = pending[:min(found)], False
        keep = self._held(pending) if hold else 0
        out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        if out:
            self._shown.append(out)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of a stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
