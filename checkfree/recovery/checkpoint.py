"""Checkpointing baseline: periodic full-model checkpoints to storage, whole-model rollback on any loss.

Every ``every`` iterations (of wall time: optimizer steps taken, redone ones included, as a periodic save
on a real cluster runs), all stages' weights and Adam states (moments, step count, lr), the data position
and the torch RNG state go to storage (``<run_dir>/checkpoints``, see ``checkfree.storage.checkpoints``);
only the last ``keep`` stay. A loss of *any* stage rolls *every* stage back to the latest readable
checkpoint (a pipeline cannot mix stages from different steps), and the steps since then are lost work.
Unlike the reference's ``one``/``whole_model`` modes (docs/paper.md, 'Reference-code bugs we avoid' item 7)
the period is real, Adam's own state is what is stored, and nothing is copied every iteration.

``setup`` saves the initial state (progress 0): the initial weights follow from the seed, which every node
knows, so a loss before the first periodic save rolls back to the start.

Why wall iterations and not progress: counted in progress, a save would wait for the model to get ``every``
steps past the last checkpoint, and when failures come more often than that (the paper's 16 %/h regime
loses a stage every ~T/270 iterations, with saves every T/100) every rollback lands before the next save and
the run never moves on. The paper's testbed saves when ``iteration % 100 == 1`` and its evaluation rolls
back to the progress held at the last multiple of the period in wall iterations, as here.
"""

from __future__ import annotations

from checkfree.plan import STORAGE, RecoveryPlan, RunView, Upkeep
from checkfree.recovery.base import RecoveryStrategy


class CheckpointRollback(RecoveryStrategy):
    name = "checkpoint"
    reads = ("every", "keep")
    table2_column = "checkpointing"

    def setup(self, view: RunView) -> Upkeep:
        return Upkeep(checkpoint=True, keep=self.cfg.keep)

    def after_step(self, view: RunView) -> Upkeep:
        return Upkeep(checkpoint=view.iteration % self.cfg.every == 0, keep=self.cfg.keep)

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        return RecoveryPlan(self.name, tuple(sorted(lost)), rollback=STORAGE)
