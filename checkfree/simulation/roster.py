"""Nodes, not stages: the ``R`` nodes of every stage, which of them are live, and when the missing ones rejoin
(docs/design.md, "Nodes and replicas").

With ``engine.replicas`` = R every logical stage runs on R nodes, data-parallel replicas of one state. A failure
strikes nodes (``FailureEvent.replica``), or a whole stage (every node of it at once). A lost node whose stage
keeps a live one is *not* a stage loss: the strategy is not asked, no weight changes (synchronous data
parallelism over the same global batch is the same arithmetic on fewer nodes), and the surviving replicas take
over its micro-batches, so the stage does ``R / live`` times its work per iteration (``Clock.staff`` re-prices
the pipeline) until the lost node's replacement arrives (``failure.replacement``, drawn for the node's slot) and
has copied the stage's state -- weights and Adam's moments -- from a surviving replica (``resync_s``): then it
joins. Only when a stage's last live node goes is the stage lost: the strategy rebuilds it, exactly as with one
node per stage, on the first of its nodes to arrive, and its other vacancies copy the rebuilt state once it is
there.

Node slot of (stage ``k``, replica ``r``) = ``r * S + k``: replica 0's slots are the stage indices, so the
replacement draws of a run with one node per stage are its stages' own. The roster only keeps the books; the
trainer drives it (``Trainer.strike``) and the clock prices what it says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from checkfree.failure_models.base import FailureEvent
from checkfree.simulation.replacements import Replacements


@dataclass
class Vacancy:
    """A node slot whose node is lost: when it was lost, when its replacement is there, when that one has
    copied the stage's state and joins (inf while its stage has no live node to copy from: set by ``rebuilt``)."""

    lost_s: float
    arrives_s: float
    joins_s: float


def node_slot(stage: int, replica: int, n_stages: int) -> int:
    return replica * n_stages + stage


class Roster:
    def __init__(self, n_stages: int, replicas: int, replacements: Replacements, resync_s: Sequence[float],
                 resync_bytes: Sequence[float]) -> None:
        self.n, self.replicas, self.replacements = n_stages, replicas, replacements
        self.resync_s, self.resync_bytes = list(resync_s), list(resync_bytes)
        """Per stage: the seconds and bytes (at the priced model's size) of copying its state to a new node."""
        self.vacant: dict[tuple[int, int], Vacancy] = {}
        """(stage, replica) -> its vacancy, for every node slot without a live node."""
        self.short_since: dict[int, float] = {}
        """Stage -> since when it has had fewer than R live nodes."""
        self.since: dict[tuple[int, int], float] = {}
        """(stage, replica) -> when its current node went live (joined, or the stage was rebuilt on it): a loss
        drawn for an earlier moment struck a node that is gone already, not this one (as ``Hosts.back_at``)."""
        self.resyncs = 0
        self.resynced_bytes = 0.0
        self.under_replicated_s = 0.0
        """Stage-seconds spent with fewer than R live nodes (an emptied stage's wait for its rebuild included)."""

    def live(self, stage: int) -> int:
        return self.replicas - sum(1 for (k, _) in self.vacant if k == stage)

    def staff(self) -> tuple[int, ...]:
        """Live nodes per stage."""
        return tuple(self.live(k) for k in range(self.n))

    def lose(self, events: Iterable[FailureEvent], floor_s: float) -> tuple[list[tuple[int, int, float]],
                                                                              dict[int, float]]:
        """The nodes ``events`` strike, of those live (a node already lost cannot be lost again); each one's
        replacement is drawn for its slot, at least ``floor_s`` (a node's start-up) after the loss. Returns the
        nodes lost, (stage, replica, time), and the stages whose last live node this took: stage -> the time of
        that loss."""
        emptied: dict[int, float] = {}
        nodes: list[tuple[int, int, float]] = []
        for event in events:
            k, t = event.stage, float(event.time_s)
            hit = False
            for r in range(self.replicas) if event.replica is None else [event.replica]:
                vacancy = self.vacant.get((k, r))
                if vacancy is not None and not vacancy.arrives_s <= t < vacancy.joins_s:
                    continue  # no node there: its replacement has not arrived yet
                if vacancy is None and t < self.since.get((k, r), -math.inf):
                    continue  # drawn for a node that was gone before this one went live
                # A live node is lost -- or the replacement that had arrived and was still copying the state
                # is: its slot asks for another one from now on.
                arrives = t + self.replacements.delay(node_slot(k, r, self.n), floor_s, t)
                joins = arrives + self.resync_s[k] if self.live(k) > 0 or vacancy is None else math.inf
                self.vacant[(k, r)] = Vacancy(t if vacancy is None else vacancy.lost_s, arrives, joins)
                self.short_since.setdefault(k, t)
                nodes.append((k, r, t))
                hit = vacancy is None
            if hit and self.live(k) == 0:
                emptied[k] = t
                for (j, _), vacancy in self.vacant.items():  # nothing to copy from until it is rebuilt
                    if j == k:
                        vacancy.joins_s = math.inf
        return nodes, emptied

    def first_arrival(self, stage: int) -> float:
        """When the first replacement node of an emptied ``stage`` is there (the strategy rebuilds it on it)."""
        return min(v.arrives_s for (k, _), v in self.vacant.items() if k == stage)

    def rebuilt(self, stage: int, at_s: float) -> None:
        """The strategy rebuilt ``stage`` on its first node to arrive, live from ``at_s``; each other vacancy joins
        once its node is there and has copied the rebuilt state."""
        mine = sorted(((v.arrives_s, r) for (k, r), v in self.vacant.items() if k == stage))
        if not mine:
            return
        del self.vacant[(stage, mine[0][1])]
        self.since[(stage, mine[0][1])] = at_s
        for _, r in mine[1:]:
            vacancy = self.vacant[(stage, r)]
            vacancy.joins_s = max(vacancy.arrives_s, at_s) + self.resync_s[stage]
        self._settle(stage, at_s)

    def next_join(self) -> float | None:
        """When the next replacement joins its stage (None: none will, until a rebuild)."""
        soonest = min((v.joins_s for v in self.vacant.values()), default=math.inf)
        return None if math.isinf(soonest) else soonest

    def join(self, now_s: float) -> list[tuple[int, int]]:
        """The replacements that have copied their stage's state by ``now_s`` join it, each at its own time (one
        due while the pipeline stood still joined then); returns their slots."""
        joined = sorted((v.joins_s, key) for key, v in self.vacant.items() if v.joins_s <= now_s)
        for at, (k, r) in joined:
            del self.vacant[(k, r)]
            self.since[(k, r)] = at
            self.resyncs += 1
            self.resynced_bytes += self.resync_bytes[k]
            self._settle(k, at)
        return [key for _, key in joined]

    def _settle(self, stage: int, now_s: float) -> None:
        if self.live(stage) == self.replicas and stage in self.short_since:
            self.under_replicated_s += now_s - self.short_since.pop(stage)

    def short_s(self, now_s: float) -> float:
        """``under_replicated_s`` with the stages still short counted up to ``now_s``."""
        return self.under_replicated_s + sum(now_s - t for t in self.short_since.values())

    def state_dict(self) -> dict[str, Any]:
        return {"vacant": [[k, r, asdict(v)] for (k, r), v in sorted(self.vacant.items())],
                "short_since": {str(k): t for k, t in self.short_since.items()},
                "since": [[k, r, t] for (k, r), t in sorted(self.since.items())],
                "resyncs": self.resyncs, "resynced_bytes": self.resynced_bytes,
                "under_replicated_s": self.under_replicated_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vacant = {(k, r): Vacancy(**v) for k, r, v in state["vacant"]}
        self.short_since = {int(k): float(t) for k, t in state["short_since"].items()}
        self.since = {(k, r): float(t) for k, r, t in state.get("since", [])}
        self.resyncs = state["resyncs"]
        self.resynced_bytes, self.under_replicated_s = state["resynced_bytes"], state["under_replicated_s"]


__all__ = ["Roster", "Vacancy", "node_slot"]
