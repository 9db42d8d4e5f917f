"""``poisson`` (default) — every eligible stage is an independent Poisson process in simulated time.

The rate is ``-ln(1 - h) / 3600`` per second, ``h`` = probability that a stage fails within one hour. Each
stage draws its arrival times lazily from its own RNG stream, so they do not depend on how the caller slices
time: a slow strategy (long iterations) and a fast one lose the same stages at the same simulated times,
only in different iterations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from checkfree.failure_models.base import FailureConfig, FailureEvent, FailureModel, by_time, check_window

STREAM = 0
"""Tag in the RNG seed, so that no two random models ever share a stream."""


def hourly_rate_to_rate(hourly_rate: float) -> float:
    """Poisson rate per second under which a stage fails within one hour with probability ``hourly_rate``."""
    return -math.log1p(-hourly_rate) / 3600.0


class PoissonFailures(FailureModel):
    """Independent Poisson processes in simulated time, one per eligible stage, drawn lazily."""

    reads = ("hourly_rate",)

    def __init__(self, stages: Sequence[int], rate_per_s: float, seed: int) -> None:
        self.rate_per_s = rate_per_s
        # One stream per stage index: which other stages are eligible never shifts a stage's arrivals.
        self._rngs = {s: np.random.default_rng([seed, STREAM, s]) for s in stages}
        self._next = {s: self._after(s, 0.0) for s in stages}

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int) -> PoissonFailures:
        return cls(stages, hourly_rate_to_rate(cfg.hourly_rate), seed)

    def _after(self, stage: int, t: float) -> float:
        if self.rate_per_s == 0.0:
            return math.inf
        return t + float(self._rngs[stage].exponential(1.0 / self.rate_per_s))

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        check_window(t_start, t_end)
        out = []
        for stage, t in self._next.items():
            while t < t_end:  # every arrival: a second one hits the stage's replacement
                out.append(FailureEvent(stage, iteration, t))
                t = self._after(stage, t)
            self._next[stage] = t
        return sorted(out, key=by_time)

    def state_dict(self) -> dict[str, Any]:
        # The lazily drawn arrivals live in the generators' states: without them a resumed run would redraw.
        return {"next": dict(self._next),
                "rngs": {stage: rng.bit_generator.state for stage, rng in self._rngs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["rngs"]) != set(self._rngs):
            raise ValueError(f"cannot resume: the saved Poisson model drew for stages "
                             f"{sorted(state['rngs'])}, this one for {sorted(self._rngs)} "
                             "(other failure.stages)")
        for stage, rng_state in state["rngs"].items():
            self._rngs[stage].bit_generator.state = rng_state
        self._next = {int(s): float(t) for s, t in state["next"].items()}


MODEL = PoissonFailures
