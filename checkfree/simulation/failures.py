"""The failures of one run, met one incident at a time (docs/design.md, "Failure models").

The models that draw them are ``checkfree.failure_models`` (one module each); ``FailureDraws`` asks the run's
model for the events of every simulated second exactly once and groups them into incidents, the losses that
strike together and are recovered together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from checkfree.failure_models import build_failure_model, failing_stages
from checkfree.failure_models.base import ONE_NODE, FailureConfig, FailureEvent, Nodes, by_time


@dataclass
class Incident:
    """Stages lost together at ``time_s``: the losses of one incident are recovered in parallel."""

    time_s: float
    stages: list[int]
    """Sorted, each once."""
    events: list[FailureEvent]
    """The failure model's events behind it (none for a numeric-guard loss)."""
    records: list[dict]
    """The failure records that go to the summary, one per loss."""


class FailureDraws:
    """The failures of one run, met one incident at a time as the run's simulated time goes on.

    The trainer asks ``next_incident(iteration, t, t_end)`` for the first incident in ``[t, t_end)``, the
    stretch of work it has still to do; after recovering from it, it asks again from the end of that
    recovery. Every simulated second is drawn exactly once, including time spent recovering, so a slower
    strategy meets more failures (as in reality) and every strategy meets the same events: an arrival during
    a recovery strikes when that recovery ends, if it did not join the incident. Stages the numeric guard
    marked (``trainer.on_nonfinite=recover``) fail at the next call, with cause "nonfinite".

    An incident gathers losses less than ``window_s`` apart (the time a recovery takes), chained: they
    strike together and are recovered together. A stage hit again within an incident ends it, and the second
    hit is an incident of its own (it strikes the stage's replacement). Without this grouping, when one
    iteration stands for many real ones (a CPU run priced in paper hours) pairs of losses that are minutes
    apart in reality — a stage and its shadow holder, both swap partners — would look simultaneous and
    unrecoverable far more often than they are; without the chaining, every loss would be its own incident."""

    def __init__(self, cfg: FailureConfig, n_stages: int, seed: int, nodes: Nodes = ONE_NODE) -> None:
        self.model = build_failure_model(cfg, n_stages, seed, nodes)
        self.may_fail = set(failing_stages(cfg, n_stages))
        self.horizon = 0.0
        """Simulated time up to which the model has been drawn."""
        self.queued: list[FailureEvent] = []
        """Drawn but not yet struck, in order of time."""
        self.pending: set[int] = set()
        self._iteration = 0

    def _draw_until(self, iteration: int, t_end: float) -> None:
        # A new iteration is always asked once, even for an empty window: its per-iteration events come then.
        if t_end > self.horizon or iteration != self._iteration:
            end = max(t_end, self.horizon)
            new = [e for e in self.model.events(iteration, self.horizon, end) if e.stage in self.may_fail]
            self.queued = sorted(self.queued + new, key=by_time)
            self.horizon, self._iteration = end, iteration

    def next_incident(self, iteration: int, t: float, t_end: float, window_s: float = 0.0) -> Incident | None:
        """The first incident of ``iteration`` that strikes in ``[t, t_end)`` (an arrival before ``t``, during
        a recovery, strikes at ``t``), or None when the stretch of work ends before any loss."""
        self._draw_until(iteration, t_end)
        nonfinite = sorted(self.pending)
        self.pending = set()
        if not nonfinite and not (self.queued and self.queued[0].time_s < t_end):
            return None
        events: list[FailureEvent] = []
        stages = set(nonfinite)
        struck = {(k, None) for k in nonfinite}  # the nodes hit so far: (stage, replica), None for every replica
        last = t if nonfinite else self.queued[0].time_s
        while True:
            self._draw_until(iteration, math.nextafter(last + window_s, math.inf))
            if not self.queued or self.queued[0].time_s - last > window_s or _node(self.queued[0]) in struck \
                    or (self.queued[0].stage, None) in struck:
                break
            event = self.queued.pop(0)
            events.append(event)
            stages.add(event.stage)
            struck.add(_node(event))
            last = event.time_s
        at = max(t, events[0].time_s if not nonfinite else t)
        records = [{"iteration": iteration, "stage": e.stage, "time_s": e.time_s,
                    **({"replica": e.replica} if e.replica is not None else {})} for e in events]
        records += [{"iteration": iteration, "stage": k, "time_s": t, "cause": "nonfinite"} for k in nonfinite]
        return Incident(at, sorted(stages), events, records)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "horizon": self.horizon, "pending": sorted(self.pending),
                "queued": [e.to_dict() for e in self.queued]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.horizon, self.pending = state["horizon"], set(state["pending"])
        self.queued = [FailureEvent(**e) for e in state.get("queued", [])]


def _node(event: FailureEvent) -> tuple[int, int | None]:
    """The node an event strikes: (stage, replica), or (stage, None) for every replica of the stage."""
    return (event.stage, event.replica)
