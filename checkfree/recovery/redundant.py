"""Redundant computation baseline (Bamboo-style): every stage also holds its successor's stage.

Stage ``k - 1`` keeps a *shadow* of stage ``k`` (mod S) — weights and optimizer state — that a real system
keeps identical by running the successor's forward and backward redundantly on every micro-batch; the
engines refresh it after each step, and the redundant compute itself is priced by the cost model.

A lost stage comes back *exactly* (bit for bit, no lost work) from its shadow. The price: twice the weight +
optimizer memory, and no answer when ``k`` and ``k - 1`` are lost together, since the only copy of ``k``
died with ``k - 1`` (see ``StrategyConfig.unrecoverable``).
"""

from __future__ import annotations

from checkfree.plan import SHADOW, Held, Rebuild, RecoveryPlan, RunView, Upkeep
from checkfree.recovery.base import RecoveryStrategy, UnrecoverableFailure


class RedundantComputation(RecoveryStrategy):
    name = "redundant"
    reads = ("unrecoverable",)
    min_stages = 2  # with one stage there is no other node to hold the shadow
    redundant_compute = True
    table2_column = "redundant"

    @staticmethod
    def shadow(k: int, n_stages: int) -> Held:
        """Stage k's shadow, held by stage k - 1 (mod S)."""
        return Held(SHADOW, k, (k - 1) % n_stages)

    def shadows(self, n_stages: int) -> tuple[Held, ...]:
        return tuple(self.shadow(k, n_stages) for k in range(n_stages))

    def setup(self, view: RunView) -> Upkeep:
        return Upkeep(refresh=self.shadows(view.n_stages))

    def after_step(self, view: RunView) -> Upkeep:
        return Upkeep(refresh=self.shadows(view.n_stages))

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        n = view.n_stages
        orphans = sorted(k for k in lost if self.shadow(k, n).holder in lost)
        if orphans and self.cfg.unrecoverable != "reinit":
            why = "; ".join(f"stage {k}'s only copy was its shadow on stage {self.shadow(k, n).holder}, lost too"
                            for k in orphans)
            raise UnrecoverableFailure(
                f"stages {sorted(lost)} were lost at iteration {view.iteration} and strategy=redundant cannot "
                f"restore them: {why}. Use strategy.unrecoverable=reinit (fresh weights for those stages), "
                "strategy=checkpoint, or a failure model that never loses adjacent stages together."
            )
        rebuilds = []
        for k in sorted(lost):
            seed = 1_000_003 * view.iteration + k
            if k in orphans:
                rebuilds.append(Rebuild(k, "reinit", seed, lr=view.base_lr))
            else:  # weights, Adam moments and lr exactly as they were
                rebuilds.append(Rebuild(k, "shadow", seed, restore=self.shadow(k, n)))
        # Each replacement node held the shadow of its successor, lost with it: made anew from the live
        # successor, after every restore, so no shadow copies a stage that is still to be restored.
        refresh = tuple(self.shadow((k + 1) % n, n) for k in sorted(lost))
        return RecoveryPlan(self.name, tuple(sorted(lost)), tuple(rebuilds), refresh=refresh)
