"""When a replacement node arrives after a node is lost (``failure.replacement``; docs/design.md, "Placement").

Every strategy so far assumed a replacement node ~30 s after every loss. On spot and volunteer machines it
often does not come for minutes or hours. The delay from a loss to its replacement's arrival is

* ``immediate`` (default) — the recovery's own time (``network.replacement_delay_s``; on the paper clock its
  30 s recovery): today's behaviour, nothing is drawn;
* ``fixed`` — ``failure.replacement_mean_h`` simulated hours, every time;
* ``exponential`` — drawn with mean ``failure.replacement_mean_h`` hours;
* ``never`` — no node ever arrives (only ``engine.no_replacement=shrink`` can keep training);
* ``trace`` — the delays of each node slot's successive replacements, from ``failure.replacement_path``
  (``trace_files.read_delays``); once a slot's records are used up, its replacements are immediate.

* ``pool`` — not a setting: under ``failure=churn`` the trace's pool of nodes says when a vacancy is filled
  (a spare at once, or the next node the trace adds; ``checkfree.failure_models.churn``).

A node cannot take over sooner than a recovery takes, so the delay used is at least the recovery's. Draws come
from the failure model's seed, one stream per node slot (the ``j``-th loss of slot ``h`` gets the ``j``-th
draw of stream ``h``): every strategy sees the same arrivals after the same losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

STREAM = 3
"""Tag in the RNG seed, apart from the failure models' own (poisson 0, bernoulli 1, zone 2)."""


class Replacements:
    def __init__(self, kind: str, mean_h: float, n_hosts: int, seed: int,
                 trace: dict[int, list[float]] | None = None,
                 pool: Callable[[int, float], float] | None = None) -> None:
        """``n_hosts``: node slots (S x R); ``pool``: (slot, time of the loss) -> when its vacancy is filled,
        from the failure model's pool of nodes (then ``kind`` is ``pool``)."""
        self.kind, self.mean_s, self.pool = ("pool" if pool is not None else kind), mean_h * 3600.0, pool
        self._rngs = [np.random.default_rng([seed, STREAM, h]) for h in range(n_hosts)]
        self._trace = {h: [d * 3600.0 for d in delays] for h, delays in (trace or {}).items()}
        self._used = [0] * n_hosts
        """How many of each slot's traced delays its losses have taken."""

    @property
    def immediate(self) -> bool:
        return self.kind == "immediate"

    def delay(self, host: int, recovery_s: float, lost_s: float | None = None) -> float:
        """Simulated seconds from the loss of ``host``'s node (at ``lost_s``) until its replacement is there
        (inf: never)."""
        if self.kind == "immediate":
            return recovery_s
        if self.pool is not None:
            return max(self.pool(host, float(lost_s)) - float(lost_s), recovery_s)
        if self.kind == "never":
            return math.inf
        if self.kind == "trace":
            traced, j = self._trace.get(host, []), self._used[host]
            self._used[host] += 1
            drawn = traced[j] if j < len(traced) else recovery_s  # past its records: immediate
        elif self.kind == "fixed":
            drawn = self.mean_s
        else:
            drawn = float(self._rngs[host].exponential(self.mean_s))
        return max(drawn, recovery_s)

    def state_dict(self) -> dict[str, Any]:
        return {"rngs": [rng.bit_generator.state for rng in self._rngs], "used": list(self._used)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for rng, rng_state in zip(self._rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        self._used = list(state["used"])


__all__ = ["Replacements"]
