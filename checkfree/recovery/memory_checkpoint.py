"""In-memory checkpointing (Gemini / REFT style): every stage rolls back to a snapshot kept in RAM.

Every ``every`` iterations each stage copies its weights and Adam state to its own host memory and sends it
on to the RAM of its next ``copies`` peers (stages k+1 .. k+copies, mod S) in the background; the run's
position (progress, data stream, RNG) goes with it (the trainer's ``MemoryStore``). Together these are an
in-memory checkpoint of the whole pipeline. A loss rolls *every* stage back to it, as a storage checkpoint
would, but far faster: the survivors restore from their own host memory, the replacements pull their
snapshot from a surviving peer. When every copy of a lost stage's snapshot died with it (the stage and all of
its holders lost together), or no complete in-memory checkpoint exists (before the first, or after a rollback
to storage made it a future the run no longer has), it falls back to the checkpoint saved to storage every
``storage_every`` iterations, as the checkpoint baseline does.
"""

from __future__ import annotations

from checkfree.plan import (
    HOST_SNAPSHOT,
    MEMORY,
    SNAPSHOT,
    STORAGE,
    Held,
    Rebuild,
    RecoveryPlan,
    RunView,
    Upkeep,
)
from checkfree.recovery.base import RecoveryStrategy
from checkfree.recovery.snapshot_restore import PeerSnapshots


class MemoryCheckpoint(PeerSnapshots, RecoveryStrategy):
    name = "memory_checkpoint"
    reads = ("every", "copies", "storage_every", "keep")
    min_stages = 2  # with one stage there is no peer to hold a snapshot
    sends_in_background = "peer"

    def validate(self, n_stages: int) -> None:
        super().validate(n_stages)
        self.check_copies(self.name, n_stages)

    def copies_of_all(self, n_stages: int) -> tuple[Held, ...]:
        """Every stage's snapshot in its own host memory and on its peers."""
        return (*(Held(HOST_SNAPSHOT, k, k) for k in range(n_stages)), *self.snapshots(n_stages))

    def held_by(self, k: int, n_stages: int) -> tuple[Held, ...]:
        return (Held(HOST_SNAPSHOT, k, k), *self.snapshots_held_by(k, n_stages))

    def setup(self, view: RunView) -> Upkeep:
        return Upkeep(refresh=self.copies_of_all(view.n_stages), snapshot=True, checkpoint=True, keep=self.cfg.keep,
                      period=self.cfg.every)

    def after_step(self, view: RunView) -> Upkeep:
        snapshot = view.iteration % self.cfg.every == 0
        return Upkeep(refresh=self.copies_of_all(view.n_stages) if snapshot else (), snapshot=snapshot,
                      checkpoint=view.iteration % self.cfg.storage_every == 0, keep=self.cfg.keep,
                      period=self.cfg.every)

    def plan(self, lost: frozenset[int], view: RunView) -> RecoveryPlan:
        n, stages = view.n_stages, tuple(sorted(lost))
        holders = {k: self.snapshot_holder(k, lost, n) for k in stages}
        if view.snapshot_progress is None or None in holders.values():
            return RecoveryPlan(self.name, stages, rollback=STORAGE)
        rebuilds = []
        for k in range(n):
            seed = 1_000_003 * view.iteration + k
            if k in lost:  # a replacement: its snapshot from a peer, and the copies it held made anew
                rebuilds.append(Rebuild(k, "rollback", seed, restore=Held(SNAPSHOT, k, holders[k]), lr=None,
                                        fetch=self.held_by(k, n)))
            else:  # a survivor: back to its snapshot, from its own host memory
                rebuilds.append(Rebuild(k, "rollback", seed, restore=Held(HOST_SNAPSHOT, k, k), lr=None))
        return RecoveryPlan(self.name, stages, tuple(rebuilds), rollback=MEMORY)
