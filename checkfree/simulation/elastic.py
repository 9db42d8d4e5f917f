"""The run's nodes: which are live, when the absent ones' replacements arrive, and where the stages run.

The failure model draws its losses per node slot (slot ``h`` is stage ``h``'s home). A loss takes every
logical stage its node runs; a node that is not there cannot be lost (an event on an absent slot strikes
nothing). After a loss, ``failure.replacement`` says when the new node comes (``checkfree.simulation.replacements``), and
``engine.no_replacement`` what the pipeline does until then:

* ``wait`` (default) — it stalls until every lost node's replacement is there; the idle time is on the
  clock. With ``failure.replacement=immediate`` that is no stall at all: every run so far.
* ``shrink`` — the strategy's rebuild of a lost stage runs on a surviving neighbour host
  (``checkfree.simulation.placement``), which then runs two (or more) logical stages; the clock re-prices the slower
  pipeline. When a node arrives, its home stage moves back to it (weights and Adam state sent over the link
  between the two hosts, priced). Fewer live hosts than ``engine.min_hosts``: the run waits for arrivals.

The strategies decide *how* a stage is rebuilt and never *where*: placement is the engine's side, and on the
local engine it changes only the clock (every stage computes in this process either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from checkfree.simulation.placement import Placement
from checkfree.simulation.replacements import Replacements


class NoHostsLeft(RuntimeError):
    """Too few nodes to place the pipeline on, and no replacement will ever arrive."""


@dataclass
class Change:
    """What replacing lost nodes did: the stall until nodes arrived, and stages that changed host."""

    wait_s: float = 0.0
    moves: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Stage -> (from host, to host), for stages that survived and run elsewhere now (their state is sent)."""
    arrivals: dict[int, float] = field(default_factory=dict)
    """Lost node -> the simulated time its replacement is there."""


class Hosts:
    def __init__(self, n_stages: int, policy: str, floor: int, replacements: Replacements) -> None:
        self.n, self.policy, self.floor, self.replacements = n_stages, policy, floor, replacements
        self.absent: dict[int, float] = {}
        """Node slot -> the simulated time its replacement arrives (inf: never), while the pipeline runs without
        it (``shrink``)."""
        self.back_at: dict[int, float] = {}
        """Node slot -> when its latest late replacement arrived or arrives: a loss drawn for the slot before
        then strikes no node (under ``wait`` too, where the pipeline stands still meanwhile)."""
        self.placement = Placement.home(n_stages)
        self.min_live = n_stages
        """The fewest live nodes the run has had."""
        self.most_per_host = 1
        """The most logical stages one host has run (what its memory had to hold)."""

    @property
    def elastic(self) -> bool:
        """Whether nodes can ever be missing (otherwise the run is priced and placed as every run so far)."""
        return not self.replacements.immediate

    def struck(self, losses: dict[int, float]) -> tuple[list[int], list[int]]:
        """(the nodes lost that were there, the logical stages they ran) for ``losses`` (node slot -> time):
        a slot whose replacement had not arrived by then has no node to lose."""
        live = [h for h, t in sorted(losses.items()) if h not in self.absent and t >= self.back_at.get(h, -math.inf)]
        return live, sorted(k for h in live for k in self.placement.stages_on(h))

    def replace(self, lost: dict[int, float], now_s: float, recovery_s: float,
                arrivals: dict[int, float] | None = None) -> Change:
        """The nodes ``lost`` (node -> the time it was lost) strike the pipeline at ``now_s``; each one's
        replacement is asked for when it was lost and takes at least ``recovery_s`` (``arrivals``: when each is
        there, given -- the first node of an emptied stage of several, ``checkfree.simulation.roster``). Under ``wait``: the stall,
        beyond the recovery, until the last one is there. Under ``shrink``: the nodes that take longer are absent
        until they arrive, and the pipeline is placed on the others."""
        ready = {h: t + self.replacements.delay(h, recovery_s, t) for h, t in sorted(lost.items())} \
            if arrivals is None else dict(arrivals)
        late = {h: t for h, t in ready.items() if t > now_s + recovery_s}
        if not late:
            return Change(arrivals=ready)
        self.back_at.update(late)
        if self.policy == "wait":
            last = max(late.values())
            if math.isinf(last):
                raise NoHostsLeft(f"node(s) {sorted(late)} lost and failure.replacement={self.replacements.kind} "
                                  "brings no replacement, so engine.no_replacement=wait would wait for ever")
            return Change(wait_s=last - now_s - recovery_s, arrivals=ready)
        rebuilt = {k for h in lost for k in self.placement.stages_on(h)}
        self.absent.update(late)
        change = self._place(now_s + recovery_s)
        change.moves = {k: move for k, move in change.moves.items() if k not in rebuilt}  # rebuilt where placed
        change.arrivals = ready
        return change

    def next_arrival(self) -> float | None:
        """When the next absent node arrives (None: none is absent or none will come)."""
        soonest = min(self.absent.values(), default=math.inf)
        return None if math.isinf(soonest) else soonest

    def arrive(self, now_s: float) -> Change:
        """The absent nodes whose replacements are there at ``now_s`` join; the stages move to their places."""
        self.absent = {h: t for h, t in self.absent.items() if t > now_s}
        return self._place(now_s)

    def _place(self, now_s: float) -> Change:
        """The placement on the live nodes; below the floor, waiting (from ``now_s``) for enough arrivals."""
        before, wait_s = self.placement, 0.0
        while (placement := self._on_live_nodes()) is None:
            soonest = self.next_arrival()
            if soonest is None:
                raise NoHostsLeft(f"only {self.n - len(self.absent)} node(s) live, below engine.min_hosts="
                                  f"{self.floor}, and failure.replacement={self.replacements.kind} brings no more")
            wait_s = max(wait_s, soonest - now_s)
            self.absent = {h: t for h, t in self.absent.items() if t > soonest}
        self.placement = placement
        self.min_live = min(self.min_live, len(placement.live))
        self.most_per_host = max(self.most_per_host, placement.max_stages_per_host())
        return Change(wait_s, before.moves(placement))

    def state_dict(self) -> dict[str, Any]:
        return {"absent": {str(h): t for h, t in self.absent.items()},
                "back_at": {str(h): t for h, t in self.back_at.items()}, "min_live": self.min_live,
                "most_per_host": self.most_per_host, "replacements": self.replacements.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.absent = {int(h): float(t) for h, t in state["absent"].items()}
        self.back_at = {int(h): float(t) for h, t in state["back_at"].items()}
        self.min_live, self.most_per_host = state["min_live"], state["most_per_host"]
        self.replacements.load_state_dict(state["replacements"])
        self.placement = self._on_live_nodes() or Placement.home(self.n)

    def _on_live_nodes(self) -> Placement | None:
        return Placement.of(set(range(self.n)) - set(self.absent), self.n, self.floor)


__all__ = ["Change", "Hosts", "NoHostsLeft"]
