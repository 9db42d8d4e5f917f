"""``churn`` — node churn from a real pool trace (``failure.path``, ``failure.format``; ``churn_files`` reads it),
replayed in simulated time. The rules (docs/running.md, 'Node churn from real traces'):

* The trace is a **pool** of nodes. The run starts at the trace's first moment with at least ``S x R`` nodes up
  (before it, the provider was still bringing the pool up), and its ``S x R`` node slots are filled from the
  nodes up then, in a seeded order (slot ``r * S + k`` is replica ``r`` of stage ``k``); a trace that never
  has that many nodes up is refused before any work. The pool's other nodes are **spares**.
* A node of a slot going down is the loss of that (stage, replica) (``FailureEvent.replica``); changes at the same
  moment strike together (one incident, as ``FailureDraws`` groups them). A spare going down is no loss.
* A **vacancy** is filled by the spare that has waited longest, at once; with none, by the next node the trace
  brings up (the oldest vacancy first). The new node takes over after a node's start-up (the recovery's time,
  ``Replacements``); with none coming yet, ``engine.no_replacement`` decides (``wait``: the run stands still).
* A trace shorter than the run **repeats**: each further pass starts at a seeded moment of the trace at which at
  least ``S x R`` nodes are up, and the nodes up at the end of the last pass take the names of the nodes up then
  (slot holders first, so no slot changes hands; surplus spares leave, missing ones come as new spares). The
  summary says how many passes the run used (``trace_passes``).

The whole replay is a function of the trace and the seed, never of the training: a node's loss and when its
vacancy is filled are known when asked (``pool()``), and every strategy meets the same churn.
"""

from __future__ import annotations

from collections import deque
from itertools import groupby
from pathlib import Path
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
    plain,
)
from checkfree.failure_models.churn_files import Change, read_pool_trace
from checkfree.run.config import ConfigError, require

STREAM = 4
"""Tag in the RNG seed (poisson 0, bernoulli 1, zone 2, replacements 3)."""


def ticks(changes: list[Change]) -> list[tuple[float, list[Change]]]:
    """The trace's changes grouped by moment, in order."""
    return [(t, list(group)) for t, group in groupby(changes, key=lambda c: c.time_s)]


def live_after(changes: list[Change]) -> list[list[str]]:
    """The nodes up after each moment of the trace (sorted names)."""
    live: set[str] = set()
    out = []
    for _, group in ticks(changes):
        for c in group:
            (live.add if c.up else live.discard)(c.node)
        out.append(sorted(live))
    return out


class ChurnFailures(FailureModel):
    """Replays a pool trace over the run's node slots; ``pool()`` says when each vacancy is filled."""

    reads = ("path", "format")

    def __init__(self, changes: list[Change], n_stages: int, replicas: int, seed: int) -> None:
        self.n, self.slots = n_stages, n_stages * replicas
        self.ticks = ticks(changes)
        self.live = live_after(changes)
        self.start, self.end = self.ticks[0][0], self.ticks[-1][0]
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self.rng = np.random.default_rng([self.seed, STREAM])
        # Moments (tick indices) a further pass may start at: enough nodes up, and trace left after them.
        self.offsets = [i for i, names in enumerate(self.live) if len(names) >= self.slots and
                        self.ticks[i][0] < self.end]
        self.holder: list[str | None] = [None] * self.slots
        self.slot_of: dict[str, int] = {}
        self.spares: list[str] = []
        self.vacancies: deque[tuple[int, float, int]] = deque()
        """Slots waiting for a node, oldest first: (slot, when its node went down, that loss's index in ``out``)."""
        self.fills: dict[tuple[int, float], float] = {}
        self.out: list[FailureEvent] = []
        self.by_spare: list[bool] = []
        """Per generated loss: whether a spare filled its vacancy in the moment it opened."""
        self.emitted = 0
        self.pass_starts: list[float] = [0.0]
        self.asked = 0.0
        first = self.offsets[0]
        names = [f"0:{x}" for x in self.rng.permutation(self.live[first])]
        for slot, node in enumerate(names[: self.slots]):
            self.holder[slot], self.slot_of[node] = node, slot
        self.spares = names[self.slots:]
        self.tick, self.base, self.offset, self.pass_no = first + 1, 0.0, self.ticks[first][0], 0
        """The next tick to play, and the run time at which the trace moment ``offset`` of pass ``pass_no`` falls."""

    @classmethod
    def check(cls, cfg: FailureConfig, n_stages: int, eligible: list[int], horizon: int | None,
              nodes: Nodes = ONE_NODE) -> None:
        require(isinstance(cfg.path, (str, Path)) and str(cfg.path) not in ("", "???"), "failure.path", cfg.path,
                "the churn model needs a pool trace, e.g. conf/failure/traces/bamboo/p3-trace.csv with "
                "failure.format=bamboo")
        require(eligible == list(range(n_stages)), "failure.stages", plain(cfg.stages),
                "a pool trace strikes whichever node it takes down, of any stage; allowed here: all")
        require(cfg.replacement == "immediate", "failure.replacement", cfg.replacement,
                "under failure=churn the pool trace says when a vacancy is filled; allowed here: immediate")
        changes = read_pool_trace(cfg.path, cfg.format)
        live, moments = live_after(changes), ticks(changes)
        replicas = nodes.replicas
        slots = n_stages * replicas
        most = max(len(names) for names in live)
        if most < slots:
            raise ConfigError(f"failure.path={cfg.path} never has more than {most} node(s) up, fewer than the run's "
                              f"{slots} node slots (model.n_stages={n_stages} x engine.replicas={replicas}); allowed "
                              "is a pool that can fill every slot.")
        if not any(len(names) >= slots for names, (t, _) in zip(live, moments) if t < moments[-1][0]):
            raise ConfigError(f"failure.path={cfg.path} has {slots} nodes up only at its last moment, so no stretch "
                              "of it can be replayed; allowed is a trace with time left after the pool fills the "
                              "run's slots.")

    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int,
              nodes: Nodes = ONE_NODE) -> ChurnFailures:
        return cls(read_pool_trace(cfg.path, cfg.format), n_stages, nodes.replicas, seed)

    # --- the replay ------------------------------------------------------------------------------------------

    def _next_time(self) -> float:
        """The run time of the next moment to play (the next pass's start when this one is played out)."""
        if self.tick < len(self.ticks):
            return self.base + self.ticks[self.tick][0] - self.offset
        return self.base + self.end - self.offset

    def _play(self) -> None:
        """Play the next moment of the trace, or start the next pass. A moment's changes strike together: its
        losses first open their vacancies, then the spares that outlive the moment (the longest waiting first)
        and the nodes it brings fill the vacancies, oldest first -- so no node fills a slot in the same moment
        it goes down, whatever the order of the trace's lines."""
        if self.tick >= len(self.ticks):
            self._wrap(self._next_time())
            return
        t = self._next_time()
        coming: list[str] = []
        for change in self.ticks[self.tick][1]:
            node = f"{self.pass_no}:{change.node}"
            if change.up:
                coming.append(node)
            elif node in coming:
                coming.remove(node)  # up and down within one moment: it never took part
            else:
                self._down(node, t)
        spares, self.spares = self.spares, []
        for node in spares:
            self._up(node, t, spare=True)
        for node in coming:
            self._up(node, t)
        self.tick += 1

    def _up(self, node: str, t: float, spare: bool = False) -> None:
        """``node`` is free at ``t``: it fills the oldest vacancy, or waits as a spare."""
        if self.vacancies:
            slot, lost, index = self.vacancies.popleft()
            self.holder[slot], self.slot_of[node] = node, slot
            self.fills[(slot, lost)] = t
            self.by_spare[index] = spare and lost == t
        else:
            self.spares.append(node)

    def _down(self, node: str, t: float) -> None:
        """``node`` goes down at ``t``: a spare is simply gone; a slot's node opens a vacancy (filled by ``_play``
        once the moment's changes are in)."""
        if node in self.spares:
            self.spares.remove(node)
            return
        slot = self.slot_of.pop(node)
        self.holder[slot] = None
        self.out.append(FailureEvent(slot % self.n, None, t, slot // self.n))
        self.by_spare.append(False)
        self.vacancies.append((slot, t, len(self.out) - 1))

    def _wrap(self, t: float) -> None:
        """Start the next pass at run time ``t``: a seeded moment of the trace, the pool renamed to its nodes."""
        i = int(self.rng.integers(len(self.offsets)))
        tick = self.offsets[i]
        self.pass_no += 1
        names = [f"{self.pass_no}:{x}" for x in self.rng.permutation(self.live[tick])]
        holders = [s for s in range(self.slots) if self.holder[s] is not None]
        for slot, name in zip(holders, names):
            self.holder[slot] = name
        self.slot_of = {self.holder[s]: s for s in holders}
        self.spares = []  # the old spares leave; the moment's other nodes fill vacancies, then wait as spares
        for node in names[len(holders):]:
            self._up(node, t)
        self.base, self.offset, self.tick = t, self.ticks[tick][0], tick + 1
        self.pass_starts.append(t)

    def _generate(self, until: float) -> None:
        while self._next_time() < until:
            self._play()

    # --- what the run asks ----------------------------------------------------------------------------------

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        check_window(t_start, t_end)
        self._generate(t_end)
        self.asked = max(self.asked, t_end)
        new = []
        while self.emitted < len(self.out) and self.out[self.emitted].time_s < t_end:
            e = self.out[self.emitted]
            new.append(FailureEvent(e.stage, iteration, e.time_s, e.replica))
            self.emitted += 1
        return sorted(new, key=by_time)

    def filled_at(self, slot: int, lost_s: float) -> float:
        """When the vacancy of ``slot`` that opened at ``lost_s`` is filled (the trace is played on as needed:
        a later pass brings nodes at the latest)."""
        key = (slot, lost_s)
        if key not in self.fills and key not in {(waiting, lost) for waiting, lost, _ in self.vacancies}:
            raise ValueError(f"the pool lost no node of slot {slot} at {lost_s} s")
        while key not in self.fills:
            self._play()
        return self.fills[key]

    def pool(self):
        return self.filled_at

    def counts(self) -> dict[str, Any]:
        done = self.by_spare[: self.emitted]
        return {"trace_passes": sum(1 for t in self.pass_starts if t < self.asked) or 1,
                "spares_used": sum(done), "vacancies_waited": len(done) - sum(done)}

    def state_dict(self) -> dict[str, Any]:
        return {"emitted": self.emitted, "asked": self.asked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The replay is a function of the trace and the seed: played again up to where the saved run was."""
        self._reset()
        self._generate(float(state["asked"]))
        self.emitted, self.asked = int(state["emitted"]), float(state["asked"])
        if self.emitted > len(self.out):
            raise ValueError(f"cannot resume: the saved run had met {self.emitted} losses of the pool trace, and it "
                             f"holds {len(self.out)} by {self.asked} s (another trace or failure.seed_offset)")


MODEL = ChurnFailures
