"""``poisson`` (default) — every eligible stage is an independent Poisson process in simulated time.

The rate is ``-ln(1 - h) / 3600`` per second, ``h`` = probability that a stage fails within one hour. Each
stage draws its arrival times lazily from its own RNG stream, so they do not depend on how the caller slices
time: a slow strategy (long iterations) and a fast one lose the same stages at the same simulated times,
only in different iterations.

``failure.unit=node`` (with ``engine.replicas`` = R): each of a stage's R nodes is such a process of its own,
``h`` per node-hour, and an arrival loses that node alone (``FailureEvent.replica``); the stage is lost when its
last node goes. Replica 0's stream is the stage's own, so with R = 1 ``node`` draws exactly what ``stage`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from checkfree.failure_models.base import (
    ONE_NODE,
    FailureConfig,
    FailureEvent,
    FailureModel,
    Nodes,
    by_time,
    check_window,
)

STREAM = 0
"""Tag in the RNG seed, so that no two random models ever share a stream."""


def hourly_rate_to_rate(hourly_rate: float) -> float:
    """Poisson rate per second under which a stage fails within one hour with probability ``hourly_rate``."""
    return -math.log1p(-hourly_rate) / 3600.0


class PoissonFailures(FailureModel):
    """Independent Poisson processes in simulated time, one per eligible stage, drawn lazily."""

    reads = ("hourly_rate", "unit")

    def __init__(self, stages: Sequence[int], rate_per_s: float, seed: int, replicas: int | None = None) -> None:
        """``replicas`` None: one process per stage, striking it whole; R: one per node (stage, replica)."""
        self.rate_per_s, self.per_node = rate_per_s, replicas is not None
        # One stream per stage (node): which other stages are eligible never shifts a stage's arrivals.
        self._rngs = {key: np.random.default_rng([seed, STREAM, *key] if key[1] else [seed, STREAM, key[0]])
                      for key in ((s, r) for s in stages for r in range(replicas or 1))}
        self._next = {key: self._after(key, 0.0) for key in self._rngs}

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int,
              nodes: Nodes = ONE_NODE) -> PoissonFailures:
        return cls(stages, hourly_rate_to_rate(cfg.hourly_rate), seed, nodes.replicas if cfg.unit == "node" else None)

    def _after(self, key: tuple[int, int], t: float) -> float:
        if self.rate_per_s == 0.0:
            return math.inf
        return t + float(self._rngs[key].exponential(1.0 / self.rate_per_s))

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        check_window(t_start, t_end)
        out = []
        for key, t in self._next.items():
            while t < t_end:  # every arrival: a second one hits the stage's replacement
                out.append(FailureEvent(key[0], iteration, t, key[1] if self.per_node else None))
                t = self._after(key, t)
            self._next[key] = t
        return sorted(out, key=by_time)

    def state_dict(self) -> dict[str, Any]:
        # The lazily drawn arrivals live in the generators' states: without them a resumed run would redraw.
        # Keyed "stage" (one process per stage, as states saved before nodes were) or "stage/replica".
        return {"next": {self._name(k): t for k, t in self._next.items()},
                "rngs": {self._name(k): rng.bit_generator.state for k, rng in self._rngs.items()}}

    def _name(self, key: tuple[int, int]) -> int | str:
        return f"{key[0]}/{key[1]}" if self.per_node else key[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {str(self._name(k)): k for k in self._rngs}
        if set(map(str, state["rngs"])) != set(names):
            raise ValueError(f"cannot resume: the saved Poisson model drew for {sorted(map(str, state['rngs']))}, "
                             f"this one for {sorted(names)} (other failure.stages, failure.unit or engine.replicas)")
        for name, rng_state in state["rngs"].items():
            self._rngs[names[str(name)]].bit_generator.state = rng_state
        self._next = {names[str(name)]: float(t) for name, t in state["next"].items()}


MODEL = PoissonFailures
