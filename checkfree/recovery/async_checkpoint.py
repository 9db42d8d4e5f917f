"""Asynchronous checkpointing (CheckFreq / DataStates-LLM / ByteCheckpoint style): save without stopping.

Every ``every`` iterations each stage copies its weights and Adam state to its own node's host memory — the
step waits only for that copy — and a background writer (a real thread: in this process on the local engine,
in each stage process on the process engine) persists it to storage while training goes on. A checkpoint
counts only once every stage's shard is persisted, which the simulated clock decides: the flush ends
``host copy + upload`` simulated seconds after the step (``Clock.flush_seconds``). A loss rolls every stage,
the data position and the RNG back to the latest *persisted* checkpoint; a loss while a flush is under way
falls back to the one before (``RecoveryPlan.unpersisted``), so ``keep`` is at least 2. Its cost: the host
copy, and whatever part of the upload the ``every`` iterations until the next checkpoint cannot hide
(``CostModel.flush_stall_seconds``: CheckFreq's rule that one flush ends before the next begins). Its memory:
the host buffer each node copies its stage's state into, one stage state (weights + Adam) per node from the
first background checkpoint on (``memory_overhead_bytes``).
"""

from __future__ import annotations

from checkfree.plan import STORAGE, RecoveryPlan, RunView, Upkeep
from checkfree.recovery.checkpoint import CheckpointRollback
from checkfree.run.config import ConfigError


class AsyncCheckpoint(CheckpointRollback):
    name = "async_checkpoint"
    sends_in_background = "storage"
    table2_column = "checkfree"  # the paper measured none: its plain iteration time + the cost model's stall

    def validate(self, n_stages: int) -> None:
        super().validate(n_stages)
        if self.cfg.keep < 2:
            raise ConfigError(f"strategy.keep={self.cfg.keep} is invalid for strategy={self.name}: a loss during "
                              "a flush rolls back to the checkpoint before it, which must still be kept; allowed "
                              "is an integer >= 2.")

    def setup(self, view: RunView) -> Upkeep:
        return Upkeep(checkpoint=True, keep=self.cfg.keep)  # the initial state: nothing to overlap it with

    def after_step(self, view: RunView) -> Upkeep:
        return Upkeep(checkpoint=view.iteration % self.cfg.every == 0, keep=self.cfg.keep, in_background=True,
                      period=self.cfg.every)

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        return RecoveryPlan(self.name, tuple(sorted(lost)), rollback=STORAGE, unpersisted=view.flushing)
