"""``zone`` — correlated losses: one draw loses every eligible stage at one location of the geo network.

The geo-distributed network puts stage ``k`` at ``GEO_LOCATIONS[k % 7]`` (``checkfree.simulation.cost``): stages 0 and 7
of a 14-stage run share Australia, and a power cut or a severed link there takes both at once. Each location
that holds an eligible stage is a Poisson process in simulated time with the rate of ``failure.hourly_rate``
(the probability that the location fails within an hour); an arrival loses all of its eligible stages at that
moment, so they strike as one incident. Each location draws from its own RNG stream, lazily, as ``poisson``'s
stages do: the events do not depend on how the caller slices time. Under at most 7 stages every location
holds one stage, and the model is ``poisson`` on its own streams.

With several nodes a stage (``engine.replicas`` = R), where they run is ``engine.replica_placement``: ``same_zone``
(default) puts every replica of stage ``k`` at the stage's location, so a location's failure loses whole stages as
above; ``spread`` puts replica ``r`` at location ``(k + r) % 7``, so it loses one replica each of up to R
neighbouring stages, and a stage is lost only when every location of its replicas has failed in one incident.
"""

from __future__ import annotations

import math
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
from checkfree.failure_models.poisson import hourly_rate_to_rate
from checkfree.simulation.networks import GEO_LOCATIONS

STREAM = 2
"""Tag in the RNG seed, so that no two random models ever share a stream."""


def location(stage: int, replica: int, nodes: Nodes) -> int:
    """The geo network's location (index into ``GEO_LOCATIONS``) of ``replica`` of ``stage``."""
    return (stage + (replica if nodes.spread else 0)) % len(GEO_LOCATIONS)


def zones(stages: list[int], nodes: Nodes = ONE_NODE) -> dict[int, list[tuple[int, int | None]]]:
    """Location index -> the nodes of the given stages there, (stage, replica) -- (stage, None) for every replica of
    a stage whose replicas share its location -- for locations holding any."""
    out: dict[int, list[tuple[int, int | None]]] = {}
    for stage in sorted(stages):
        if nodes.spread:
            for r in range(nodes.replicas):
                out.setdefault(location(stage, r, nodes), []).append((stage, r))
        else:
            out.setdefault(location(stage, 0, nodes), []).append((stage, None))
    return out


class ZoneFailures(FailureModel):
    """One Poisson process per location; an arrival loses the location's eligible stages together."""

    reads = ("hourly_rate",)

    def __init__(self, stages: list[int], rate_per_s: float, seed: int, nodes: Nodes = ONE_NODE) -> None:
        self.rate_per_s, self.zones = rate_per_s, zones(stages, nodes)
        self._rngs = {z: np.random.default_rng([seed, STREAM, z]) for z in self.zones}
        self._next = {z: self._after(z, 0.0) for z in self.zones}

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int, nodes: Nodes = ONE_NODE) -> ZoneFailures:
        return cls(stages, hourly_rate_to_rate(cfg.hourly_rate), seed, nodes)

    def _after(self, zone: int, t: float) -> float:
        if self.rate_per_s == 0.0:
            return math.inf
        return t + float(self._rngs[zone].exponential(1.0 / self.rate_per_s))

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        check_window(t_start, t_end)
        out = []
        for zone, t in self._next.items():
            while t < t_end:
                out += [FailureEvent(stage, iteration, t, replica) for stage, replica in self.zones[zone]]
                t = self._after(zone, t)
            self._next[zone] = t
        return sorted(out, key=by_time)

    def state_dict(self) -> dict[str, Any]:
        return {"next": dict(self._next), "rngs": {z: rng.bit_generator.state for z, rng in self._rngs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["rngs"]) != set(self._rngs):
            raise ValueError(f"cannot resume: the saved zone model drew for locations {sorted(state['rngs'])}, "
                             f"this one for {sorted(self._rngs)} (other failure.stages or model.n_stages)")
        for zone, rng_state in state["rngs"].items():
            self._rngs[zone].bit_generator.state = rng_state
        self._next = {int(z): float(t) for z, t in state["next"].items()}


MODEL = ZoneFailures
