"""``trace`` — replay a JSON or CSV file of events, each by ``iteration`` or by ``time_s`` (``trace_files``).

Shipped traces: ``conf/failure/traces/example.json`` (stage 2 lost at iteration 5) and
``conf/failure/traces/reference_33.json``, the reference throughput testbed's 33 %/h events (gensyn-ai/CheckFree
``failure_p_configs/33.json``). The latter keeps the reference's stage ids 1..6, the body stages of its 7-stage
layout whose stage 0 never fails, so it validates only with ``model.n_stages=7``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from checkfree.failure_models.base import (
    ONE_NODE,
    FailureConfig,
    FailureEvent,
    FailureModel,
    Nodes,
    by_time,
    check_window,
    plain,
)
from checkfree.failure_models.trace_files import read_trace, read_trace_records
from checkfree.run.config import ConfigError, require


class TraceFailures(FailureModel):
    """Replays trace events: by iteration when that iteration is processed, by time in their window."""

    reads = ("path",)

    def __init__(self, events: Sequence[FailureEvent]) -> None:
        self._by_iteration: dict[int, set[tuple[int, int]]] = {}
        for e in events:  # a whole stage's loss is replica -1 here, so that it sorts before its replicas'
            if e.iteration is not None:
                self._by_iteration.setdefault(e.iteration, set()).add((e.stage, _replica(e)))
        self._timed = sorted((e.time_s, e.stage, _replica(e)) for e in events if e.time_s is not None)
        self._next = 0  # the first timed event not reported yet
        self._answered = 0  # the last iteration whose by-iteration events were reported

    @classmethod
    def check(cls, cfg: FailureConfig, n_stages: int, eligible: list[int], horizon: int | None,
              nodes: Nodes = ONE_NODE) -> None:
        require(isinstance(cfg.path, (str, Path)) and str(cfg.path) not in ("", "???"), "failure.path", cfg.path,
                "the trace model needs a JSON or CSV file of events, e.g. conf/failure/traces/example.json")
        records = read_trace_records(cfg.path)
        require(len(records) > 0, "failure.path", str(cfg.path),
                "the trace holds no event, so nothing would fail; allowed is a trace of at least one event "
                "(or failure=none for no failures)")
        seen: dict[tuple, str] = {}
        for where, event in records:
            # The same loss twice is a slip in the trace, not two losses: the second would meet a stage that is
            # already being recovered (per-iteration events) or repeat one moment.
            key = (event.stage, event.iteration, event.time_s, event.replica)
            if key in seen:
                raise ConfigError(f"failure.path={cfg.path} {where} repeats the event of {seen[key]} (stage "
                                  f"{event.stage} at {_moment(event)}); allowed is each loss once.")
            seen[key] = where
            if event.replica is not None and event.replica >= nodes.replicas:
                raise ConfigError(f"failure.path={cfg.path} {where} has replica {event.replica}, which is out of "
                                  f"range: allowed 0..{nodes.replicas - 1} (engine.replicas={nodes.replicas}), or no replica "
                                  "for the whole stage.")
            if horizon is not None and event.iteration is not None and event.iteration > horizon:
                raise ConfigError(f"failure.path={cfg.path} {where} is at iteration {event.iteration}, after the "
                                  f"run's last (trainer.iterations={horizon}), so it would never happen; allowed "
                                  f"are iterations 1..{horizon} (or trainer.save_every=N for a run to be continued).")
            if event.stage >= n_stages:
                raise ConfigError(f"failure.path={cfg.path} {where} has stage {event.stage}, which is out of range: "
                                  f"allowed 0..{n_stages - 1} (model.n_stages={n_stages}).")
            if event.stage not in eligible:
                raise ConfigError(f"failure.path={cfg.path} {where} has stage {event.stage}, which may not fail "
                                  f"under failure.stages={plain(cfg.stages)!r}: allowed {eligible}.")

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int, nodes: Nodes = ONE_NODE) -> TraceFailures:
        return cls(read_trace(cfg.path))

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        check_window(t_start, t_end)
        lost = []
        if iteration != self._answered:
            lost = [(float(t_start), stage, r) for stage, r in self._by_iteration.get(iteration, ())]
            self._answered = iteration
        while self._next < len(self._timed) and self._timed[self._next][0] < t_end:
            lost.append(self._timed[self._next])
            self._next += 1
        return sorted((FailureEvent(s, iteration, t, None if r < 0 else r) for t, s, r in lost), key=by_time)

    def state_dict(self) -> dict[str, Any]:
        return {"next": self._next, "answered": self._answered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next, self._answered = int(state["next"]), int(state.get("answered", 0))


def _replica(event: FailureEvent) -> int:
    return -1 if event.replica is None else event.replica


def _moment(event: FailureEvent) -> str:
    return f"iteration {event.iteration}" if event.iteration is not None else f"time_s {event.time_s}"


MODEL = TraceFailures
