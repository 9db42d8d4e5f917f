"""``bernoulli`` — the reference simulator's model: each eligible stage fails with probability ``p`` per
iteration (or ``BERNOULLI_PRESETS[preset]``, from the reference's ``simulate_training`` configs). The draw for
an iteration depends only on (seed, iteration), never on what was asked before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from checkfree.failure_models.base import (
    ONE_NODE,
    FailureConfig,
    FailureEvent,
    FailureModel,
    Nodes,
    check_window,
)
from checkfree.run.config import require

# Per-stage per-iteration probabilities of the reference configs, keyed "<model>_<hourly %>" (the reference's simulate_training configs).
BERNOULLI_PRESETS: dict[str, float] = {
    "500m_5": 0.0009, "500m_10": 0.002, "500m_16": 0.004, "500m_33": 0.01,
    "124m_10": 0.0006, "124m_16": 0.001, "1_5b_10": 0.004, "1_5b_16": 0.008,
}

STREAM = 1
"""Tag in the RNG seed, so that no two random models ever share a stream."""


class BernoulliFailures(FailureModel):
    """Each eligible stage fails with probability ``p`` in every iteration, independently.

    Nothing to save for a resume (which happens between iterations): it only remembers the iteration it last
    answered, so that a second window of that iteration draws nothing new."""

    reads = ("p", "preset")

    def __init__(self, stages: Sequence[int], n_stages: int, p: float, seed: int) -> None:
        self.stages, self.n_stages, self.p, self.seed = sorted(stages), n_stages, p, seed
        self._answered = 0

    @classmethod
    def check(cls, cfg: FailureConfig, n_stages: int, eligible: list[int], horizon: int | None,
              nodes: Nodes = ONE_NODE) -> None:
        require(cfg.preset is None or cfg.preset in BERNOULLI_PRESETS, "failure.preset", cfg.preset,
                f"allowed null or one of {', '.join(BERNOULLI_PRESETS)}")

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int, nodes: Nodes = ONE_NODE) -> BernoulliFailures:
        p = BERNOULLI_PRESETS[cfg.preset] if cfg.preset is not None else float(cfg.p)
        return cls(stages, n_stages, p, seed)

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        check_window(t_start, t_end)
        if iteration == self._answered:
            return []
        self._answered = iteration
        # Seeded by the iteration alone, so the events do not depend on which iterations were asked before.
        rng = np.random.default_rng([self.seed, STREAM, iteration])
        draws = rng.random(self.n_stages)  # one draw per stage, eligible or not, so masks never shift draws
        return [FailureEvent(s, iteration, float(t_start)) for s in self.stages if draws[s] < self.p]


MODEL = BernoulliFailures
