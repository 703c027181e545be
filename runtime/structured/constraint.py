"""One answer's grammar state, with what the decoders need per step: the mask of allowed ids,
accepting a sampled id, the run of ids the grammar forces next, and whether the answer is complete.
The model's end ids (the bundle's stop ids) are allowed exactly when the grammar accepts."""

from __future__ import annotations

from typing import Any

import numpy as np

from rksmolvlm.runtime.structured.errors import TokenRejectedError

__all__ = ["Constraint"]


class Constraint:
    """Per-request state over a compiled grammar (made by ``Grammar.constraint()``); not thread-safe."""

    def __init__(self, matcher: Any, vocab_size: int, stop_ids: tuple[int, ...]):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.accepted = 0  # ids accepted so far (stop id included)
        self._ended = False  # a stop id was accepted
        self._unfed_stop = False  # ... while the matcher was already stopped (so it never saw it)

    def bitmask(self) -> np.ndarray:
        """The allowed ids as llguidance's packed int32 words (bit ``i % 32`` of word ``i // 32``).
        The array is reused by the next call."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._raise_if_error()
        return self._words

    def mask(self) -> np.ndarray:
        """The allowed ids as a bool array of ``vocab_size``; ids the tokenizer lacks are False."""
        bits = np.unpackbits(self.bitmask().view(np.uint8), bitorder="little")
        return bits[:self.vocab_size].view(bool)

    def allows(self, token_id: int) -> bool:
        """Whether ``token_id`` may come next: the cheap check-first test (no mask computed)."""
        if not 0 <= token_id < self.vocab_size:
            return False
        if token_id in self.stop_ids:  # once the grammar is complete the matcher validates no id, not even a stop
            return self._matcher.is_accepting() and not self._matcher.is_error()
        return self._matcher.validate_tokens([int(token_id)]) == 1

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``; a disallowed id raises TokenRejectedError and leaves the state as it was."""
        if not self.allows(token_id):
            raise TokenRejectedError(f"token {token_id} is not allowed by the grammar here (after {self.accepted} "
                                     "tokens): sample under mask() or check allows() first", token_id=token_id)
        # a stop after a grammar that cannot go on is not fed to the matcher (it validates nothing then)
        if self._matcher.is_stopped():
            self._unfed_stop = True
        elif not self._matcher.consume_token(int(token_id)):
            self._raise_if_error()
        self.accepted += 1
        if token_id in self.stop_ids:
            self._ended = True

    def accept_many(self, token_ids: list[int]) -> None:
        """Advance past a run of ids (e.g. the forced ones), all or none."""
        ids = [int(t) for t in token_ids]
        if self._matcher.validate_tokens(ids) != len(ids):
            good = self._matcher.validate_tokens(ids)
            raise TokenRejectedError(f"token {ids[good]} (at {good} of the run) is not allowed by the grammar",
                                     token_id=ids[good])
        if not self._matcher.consume_tokens(ids):
            self._raise_if_error()
        self.accepted += len(ids)
        self._ended = self._ended or any(t in self.stop_ids for t in ids)

    def forced(self) -> list[int]:
        """The ids the grammar forces next (possibly none); the NPU path feeds them in one call."""
        if self.done:
            return []
        return list(self._matcher.compute_ff_tokens())

    @property
    def accepting(self) -> bool:
        """The text so far is a complete answer: a stop id is allowed now."""
        return self._matcher.is_accepting()

    @property
    def done(self) -> bool:
        """The answer is complete and nothing may follow (a stop id was accepted, or the grammar
        cannot be extended): end the answer with finish_reason "stop"."""
        return self._ended or self._matcher.is_stopped()

    def is_stop(self, token_id: int) -> bool:
        return token_id in self.stop_ids

    def rollback(self, count: int) -> None:
        """Undo the last ``count`` accepted ids."""
        if not 0 <= count <= self.accepted:
            raise ValueError(f"cannot roll back {count} of {self.accepted} accepted tokens")
        fed = count - (1 if self._unfed_stop and count else 0)
        if fed and not self._matcher.rollback(fed):
            raise ValueError(f"cannot roll back {count} of {self.accepted} accepted tokens")
        if count:
            self._ended = self._unfed_stop = False
        self.accepted -= count

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise TokenRejectedError(f"the grammar state is broken: {self._matcher.get_error().splitlines()[0]}",
                                     token_id=-1)
