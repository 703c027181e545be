"""One answer's choices as both engines make them: ``begin()`` gives the ids the grammar forces
before anything is sampled, ``step(logits)`` samples one id (under the grammar when there is one)
and returns it followed by the run the grammar then forces. The host engine feeds the returned ids
one forward each (or together); the NPU engine feeds them in one ``rkllm_run`` (token input,
keep_history=1) and reads the logits of the last. ``done`` says the grammar is complete (finish
"stop"); without a grammar a Guide is the plain sampler and never done by itself."""

from __future__ import annotations

import numpy as np

from rksmolvlm.runtime.structured.constraint import Constraint
from rksmolvlm.runtime.structured.sampler import Sampler, SamplingOptions

__all__ = ["Guide"]


class Guide:
    """Sampler + optional Constraint for one answer; ``produced`` is every id chosen or forced so far."""

    def __init__(self, options: SamplingOptions, constraint: Constraint | None = None):
        self.sampler = Sampler(options)
        self.constraint = constraint
        self.produced: list[int] = []
        self.forced_ids = 0  # ids the grammar wrote without sampling

    def begin(self) -> list[int]:
        """The ids forced at the start of the answer (already accepted); feed them after the prompt."""
        return self._forced_run()

    def step(self, logits: np.ndarray) -> list[int]:
        """One sampled id from this step's logits, then the forced run after it (all accepted and in
        ``produced``). Ends with a stop id when the model chose to stop."""
        token = self.sampler.pick(logits, self.produced, self.constraint)
        if self.constraint is not None:
            self.constraint.accept(token)
        self.produced.append(token)
        if self.constraint is None or self.constraint.is_stop(token):
            return [token]
        return [token, *self._forced_run()]

    @property
    def done(self) -> bool:
        """The grammar is complete: end the answer (finish_reason "stop"), whatever the model would add."""
        return self.constraint is not None and self.constraint.done

    def _forced_run(self) -> list[int]:
        if self.constraint is None:
            return []
        forced = self.constraint.forced()
        if forced:
            self.constraint.accept_many(forced)
            self.produced.extend(forced)
            self.forced_ids += len(forced)
        return forced

