"""Choosing the next id on the CPU from one step's logits, with or without a grammar: penalties,
then the grammar's mask, then greedy or temperature / top-k / top-p with a seeded generator.

Same semantics as the host engine's sampler today (rksmolvlm/preview/host_engines.py): the
penalties over the ids produced so far, ``greedy`` as argmax (first maximum), top-k keeping ties
with the k-th value, top-p keeping the smallest prefix of the sorted distribution that reaches p.
Greedy picks equal the host engine's exactly (float32 arithmetic, same order); sampled picks
follow the same distribution from numpy's generator, not torch's random stream.

With a grammar, the freely chosen id is checked first (llama.cpp's fast path) and the full mask is
computed only when the grammar rejects it. That is exact, not an approximation, where no filter
depends on the allowed set: greedy (the argmax is allowed, so it is the masked argmax) and plain
temperature sampling (a first draw kept when allowed, else a draw from the masked distribution,
gives p(t)/P(allowed), the masked distribution). With top-k or top-p the mask comes first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from rksmolvlm.runtime.structured.constraint import Constraint

__all__ = ["SamplingOptions", "Sampler", "apply_penalties"]


class SamplingOptions(Protocol):
    """What the sampler reads of a generation config (runtime.engines.GenerationConfig has all of it)."""

    # read-only members: a frozen GenerationConfig satisfies them
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def repeat_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def greedy(self) -> bool: ...


class Sampler:
    """One answer's sampler: the options and the random generator seeded once per answer."""

    def __init__(self, options: SamplingOptions, *, check_first: bool = True):
        self.options = options
        self.check_first = check_first  # off: always mask first (for measuring the fast path)
        self.rng = np.random.default_rng(options.seed)
        self.fast_path_hits = 0  # picks the grammar allowed without a mask
        self.masks = 0  # full masks computed

    def pick(self, logits: np.ndarray, previous: Sequence[int] = (), constraint: Constraint | None = None) -> int:
        """The next id from one step's logits (any float dtype, shape (vocab,)); with a constraint
        the id is one the grammar allows (the caller then ``constraint.accept``s it)."""
        o = self.options
        scores = apply_penalties(np.asarray(logits, dtype=np.float32), previous, o.repeat_penalty,
                                 o.frequency_penalty, o.presence_penalty)
        if constraint is None:
            return self._choose(scores)
        exact_fast_path = o.greedy or (not o.top_k and o.top_p >= 1.0)
        if exact_fast_path and self.check_first:
            token = self._choose(scores)
            if constraint.allows(token):
                self.fast_path_hits += 1
                return token
        self.masks += 1
        allowed = np.flatnonzero(constraint.mask()[:scores.shape[0]])  # ids past the grammar's vocabulary: never
        if not allowed.size:
            raise RuntimeError("the grammar allows no id within the model's logits: the tokenizer and the model "
                               "disagree")
        return self._choose(scores, allowed)

    def _choose(self, scores: np.ndarray, ids: np.ndarray | None = None) -> int:
        """One id among ``ids`` (all when None) by the options; works on the candidates only, so a
        masked or top-k pick costs what its candidates cost, not the vocabulary."""
        o = self.options
        sub = scores if ids is None else scores[ids]
        if o.greedy:
            best = int(np.argmax(sub))  # the first maximum, as torch.argmax
            return best if ids is None else int(ids[best])
        sub = sub / np.float32(o.temperature)
        if o.top_k and o.top_k < sub.shape[0]:
            kth = np.partition(sub, sub.shape[0] - o.top_k)[sub.shape[0] - o.top_k]
            keep = np.flatnonzero(sub >= kth)  # ties with the k-th value stay, as in the host engine
            sub = sub[keep]
            ids = keep if ids is None else ids[keep]
        probs = np.exp((sub - sub.max()).astype(np.float64))
        if o.top_p < 1.0:
            keep = _nucleus(probs / probs.sum(), o.top_p)
            probs = probs[keep]
            ids = keep if ids is None else ids[keep]
        cumulative = np.cumsum(probs)
        j = min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")), probs.shape[0] - 1)
        return j if ids is None else int(ids[j])


def apply_penalties(logits: np.ndarray, previous: Sequence[int], repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> np.ndarray:
    """A float32 copy of ``logits`` with the penalties over ``previous`` (the ids produced so far):
    the repeat penalty divides positive and multiplies negative logits of every id seen; OpenAI's
    logit -= count × frequency + (count > 0) × presence."""
    scores = np.array(logits, dtype=np.float32, copy=True)
    if not len(previous):
        return scores
    if repeat_penalty != 1.0:
        index = np.unique(np.asarray(previous, dtype=np.int64))
        index = index[index < scores.shape[0]]
        values = scores[index]
        rp = np.float32(repeat_penalty)
        scores[index] = np.where(values > 0, values / rp, values * rp)
    if frequency_penalty or presence_penalty:
        counts = np.bincount(np.asarray(previous, dtype=np.int64), minlength=scores.shape[0])[:scores.shape[0]]
        counts = counts.astype(np.float32)
        scores -= (counts * np.float32(frequency_penalty)
                   + (counts > 0).astype(np.float32) * np.float32(presence_penalty))
    return scores


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest prefix of the sorted distribution that reaches ``top_p`` (an id is kept
    while the mass before it is below p); sorts only the head, growing it until the prefix ends in it."""
    head = 64
    while True:
        if head >= probs.shape[0]:
            order = np.argsort(-probs, kind="stable")
        else:
            top = np.argpartition(-probs, head)[:head]
            order = top[np.argsort(-probs[top], kind="stable")]
        ordered = probs[order]
        keep = np.cumsum(ordered) - ordered < top_p
        keep[0] = True  # the top id always, whatever float type p is compared in
        if head >= probs.shape[0] or not keep[-1]:
            return order[keep]
        head *= 4
