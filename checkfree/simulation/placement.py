"""Placement: which host runs which logical stages (docs/design.md, "Placement: logical stages on hosts").

A run has ``S`` logical stages for its whole life: weights, metrics, checkpoints, resume state and export are
keyed by logical stage. The hosts are the run's ``S`` node slots; slot ``h`` is stage ``h``'s *home*. While
every slot has a live node, each stage runs at home (the placement of every run so far). When a node is lost
and no replacement arrives (``failure.replacement``), ``engine.no_replacement=shrink`` places its stages on
the neighbouring hosts that survive; when a node arrives, its home stage goes back to it.

The placement is a function of which hosts are live (``Placement.of``), never of the path that led there, so
a resume needs only the live set, and "move back" is simply the placement of the larger live set. The rule:

* a stage whose home host is live runs at home;
* a run of consecutive stages ``a..b`` whose homes are all absent goes to the live hosts on either side:
  the first ``ceil(L / 2)`` of its ``L`` stages to the left neighbour (host ``a - 1``), the rest to the
  right one (host ``b + 1``); at an edge of the pipeline all go to the one neighbour there is. Each host
  thus runs consecutive logical stages, and the stage lost alone lands on the host of the stage before it
  (stage 0 on host 1);
* fewer live hosts than the floor (``engine.min_hosts``), or none at all: no placement — the run waits
  for nodes to arrive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from checkfree.stage.routes import Visit


@dataclass(frozen=True)
class Placement:
    hosts: tuple[int, ...]
    """``hosts[k]``: the host (node slot) that runs logical stage ``k``; non-decreasing in ``k``."""

    @classmethod
    def home(cls, n_stages: int) -> Placement:
        """Every stage on its own node: the placement of a run with every node live."""
        return cls(tuple(range(n_stages)))

    @classmethod
    def of(cls, live: set[int] | frozenset[int], n_stages: int, floor: int = 1) -> Placement | None:
        """The placement on the ``live`` hosts (module docstring's rule); None below ``floor`` live hosts."""
        if len(live) < max(floor, 1):
            return None
        hosts = list(range(n_stages))
        k = 0
        while k < n_stages:
            if k in live:
                k += 1
                continue
            end = k
            while end + 1 < n_stages and end + 1 not in live:
                end += 1
            left, right = k - 1 if k > 0 else None, end + 1 if end + 1 < n_stages else None
            n_left = (math.ceil((end - k + 1) / 2) if right is not None else end - k + 1) if left is not None else 0
            for j in range(k, end + 1):
                hosts[j] = left if j - k < n_left else right
            k = end + 1
        return cls(tuple(hosts))

    @property
    def n_stages(self) -> int:
        return len(self.hosts)

    @property
    def live(self) -> tuple[int, ...]:
        """The hosts that run at least one stage, in pipeline order."""
        return tuple(dict.fromkeys(self.hosts))

    @property
    def at_home(self) -> bool:
        return all(h == k for k, h in enumerate(self.hosts))

    def stages_on(self, host: int) -> list[int]:
        return [k for k, h in enumerate(self.hosts) if h == host]

    def max_stages_per_host(self) -> int:
        return max(self.hosts.count(h) for h in self.live)

    def moves(self, after: Placement) -> dict[int, tuple[int, int]]:
        """Stage -> (from host, to host) for every stage that ``after`` runs on another host."""
        return {k: (a, b) for k, (a, b) in enumerate(zip(self.hosts, after.hosts, strict=True)) if a != b}

    def hops(self, route: tuple[Visit, ...]) -> int:
        """Hops between hosts along a micro-batch's route: consecutive visits on one host are no hop."""
        return sum(1 for v in route if v.prev is not None and self.hosts[v.prev] != self.hosts[v.stage])


__all__ = ["Placement"]
