"""Ablations of the CheckFree rule: what if the lost stage were rebuilt some other way?

* ``uniform`` — plain 0.5/0.5 average of the neighbours (distance-weighted for runs of lost stages).
* ``copy`` — copy the nearest surviving neighbour (the previous one on a tie), as layer-stacking does.
* ``zero`` — copy, then zero every MLP ``down_proj`` so the stage starts close to the identity.
* ``random`` — fresh random weights.

They share CheckFree's edge rules and its restart (fresh optimizer, ``lr_scale * lr``), so only the rebuild
of an intermediate stage differs. Unlike the reference, there is no hidden distillation loop or all-reduce
that could zero the stage (docs/paper.md, 'Reference-code bugs we avoid' item 6).
"""

from __future__ import annotations

from checkfree.plan import ZERO_DOWN_PROJ, Rebuild, RunView
from checkfree.recovery.checkfree import NeighbourRecovery


class Uniform(NeighbourRecovery):
    name = "uniform"

    def neighbour_weights(self, left: int, right: int, view: RunView) -> tuple[float, float]:
        return 1.0, 1.0


class Copy(NeighbourRecovery):
    name = "copy"
    transforms: tuple[str, ...] = ()

    def combine(self, k: int, left: int, right: int, view: RunView) -> Rebuild:
        source = left if k - left <= right - k else right
        return self.make(k, view, self.name, sources=((source, 1.0),), transforms=self.transforms)


class Zero(Copy):
    name = "zero"
    transforms = (ZERO_DOWN_PROJ,)


class Random(NeighbourRecovery):
    name = "random"

    def combine(self, k: int, left: int, right: int, view: RunView) -> Rebuild:
        return self.make(k, view, self.name)  # the new node's fresh weights are the recovery
