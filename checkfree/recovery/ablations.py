"""Ablations of the CheckFree rule: what if the lost stage were rebuilt some other way?

* ``uniform`` — plain 0.5/0.5 average of the neighbours (distance-weighted for runs of lost stages).
* ``copy`` — copy the nearest surviving neighbour (the previous one on a tie), as layer-stacking does.
* ``zero`` — copy, then zero every MLP ``down_proj`` so the stage starts close to the identity.
* ``random`` — fresh random weights.

They share CheckFree's edge rules (an edge stage has no neighbour on one side: ``unrecoverable``) and
its restart (fresh optimizer, ``lr_scale * lr``), so only the rebuild differs. Unlike the reference,
there is no hidden distillation loop or all-reduce that could zero the stage (PAPER §9.6).
"""

from __future__ import annotations

import torch

from checkfree.recovery.base import RecoveryContext, RecoveryReport, state_bytes
from checkfree.recovery.checkfree import NeighbourRecovery


class Uniform(NeighbourRecovery):
    name = "uniform"

    def neighbour_weights(self, left: int, right: int, ctx: RecoveryContext) -> tuple[float, float]:
        return 1.0, 1.0


class Copy(NeighbourRecovery):
    name = "copy"

    def combine(self, k: int, left: int, right: int, ctx: RecoveryContext) -> RecoveryReport:
        source = left if k - left <= right - k else right
        body = ctx.pipeline.stages[source].body_state()
        ctx.pipeline.stages[k].load_state_dict(body, strict=False)
        return self._report(k, self.name, [source], [1.0], state_bytes(body))


class Zero(Copy):
    name = "zero"

    def combine(self, k: int, left: int, right: int, ctx: RecoveryContext) -> RecoveryReport:
        report = super().combine(k, left, right, ctx)
        with torch.no_grad():
            for layer in ctx.pipeline.stages[k].layers:
                layer.mlp.down_proj.weight.zero_()
        return report


class Random(NeighbourRecovery):
    name = "random"

    def combine(self, k: int, left: int, right: int, ctx: RecoveryContext) -> RecoveryReport:
        # recover() has already given the stage fresh random weights: keep them.
        return self._report(k, self.name, [], [], 0)
