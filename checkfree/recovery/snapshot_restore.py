"""Snapshot restore: bring back *only* the lost stage, from a slightly stale in-memory snapshot of it.

Every ``every`` iterations each stage sends a snapshot of its weights and Adam state to the RAM of its next
``copies`` peers (stages k+1 .. k+copies, mod S), in the background while training goes on (the step waits
only for the device -> host copy; see ``CostModel.background_seconds``). A lost stage is restored from a
surviving holder of its snapshot — weights, Adam moments, step count and lr exactly as they were at the
snapshot, so it is ``staleness`` steps behind the stages around it, which keep going untouched. This is the
paper's reference code's ``one`` mode done right (its ``ours-avg-ablation`` too) and the "lightweight
checkpointing" the paper names as future work; Gemini, REFT and DeadPool keep such copies in peers' RAM.

When every copy of a lost stage's snapshot died with it (the stage and its holders lost together, the
paper's stated limitation), the stage is rebuilt by CheckFree's rule instead (gradient-norm-weighted average
of its surviving neighbours, fresh optimizer at ``lr_scale * lr``; an edge by ``edge_rule``), so adjacent
losses are covered too. A replacement node also re-makes the snapshots it held, from their live owners.
"""

from __future__ import annotations

from checkfree.plan import SNAPSHOT, Held, Rebuild, RunView, Upkeep
from checkfree.recovery.checkfree import CheckFree
from checkfree.run.config import ConfigError


class PeerSnapshots:
    """Each stage's snapshot on its next ``copies`` peers (for the strategies that keep them)."""

    cfg: object
    snapshot_kind = SNAPSHOT
    """The kind of held copy a snapshot is (``checkfree.plan.KINDS``)."""

    def snapshots(self, n_stages: int) -> tuple[Held, ...]:
        return tuple(Held(self.snapshot_kind, k, (k + j) % n_stages) for k in range(n_stages)
                     for j in range(1, self.cfg.copies + 1))

    def snapshot_holder(self, k: int, lost: frozenset[int], n_stages: int) -> int | None:
        """The nearest peer that still holds stage ``k``'s snapshot, or None when every one was lost."""
        return next(((k + j) % n_stages for j in range(1, self.cfg.copies + 1) if (k + j) % n_stages not in lost),
                    None)

    def snapshots_held_by(self, k: int, n_stages: int) -> tuple[Held, ...]:
        return tuple(h for h in self.snapshots(n_stages) if h.holder == k)

    def check_copies(self, name: str, n_stages: int) -> None:
        if self.cfg.copies >= n_stages:
            raise ConfigError(f"strategy.copies={self.cfg.copies} is invalid for strategy={name} with "
                              f"model.n_stages={n_stages}: each stage's snapshot goes to that many other stages; "
                              f"allowed is 1..{n_stages - 1}.")


class SnapshotRestore(PeerSnapshots, CheckFree):
    name = "snapshot_restore"
    reads = (*CheckFree.reads, "every", "copies")
    sends_in_background = "peer"

    def validate(self, n_stages: int) -> None:
        super().validate(n_stages)
        self.check_copies(self.name, n_stages)

    def held_by(self, k: int, n_stages: int) -> tuple[Held, ...]:
        return (*super().held_by(k, n_stages), *self.snapshots_held_by(k, n_stages))

    def setup(self, view: RunView) -> Upkeep:
        n = view.n_stages
        return Upkeep(refresh=(*self.replicas(n), *self.snapshots(n)), period=self.cfg.every)

    def after_step(self, view: RunView) -> Upkeep:
        replicas = super().after_step(view).refresh
        snapshots = self.snapshots(view.n_stages) if view.iteration % self.cfg.every == 0 else ()
        return Upkeep(refresh=(*replicas, *snapshots), period=self.cfg.every)

    snapshot_method = "snapshot"
    """What a restore from a snapshot is called in the records."""

    def restored_lr(self, view: RunView) -> float | None:
        """The restored stage's learning rate: None, as the snapshot's own Adam state and lr come back with its
        weights."""
        return None

    def rebuild(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        holder = self.snapshot_holder(k, lost, view.n_stages)
        if holder is None:
            return super().rebuild(k, lost, view)  # its snapshots died with it: CheckFree's rule
        held, lr = Held(self.snapshot_kind, k, holder), self.restored_lr(view)
        details = {"staleness": view.progress - view.held_since[held], **({"lr": lr} if lr is not None else {})}
        return Rebuild(k, self.snapshot_method, self.fresh_seed(view, k), restore=held, lr=lr,
                       fetch=self.held_by(k, view.n_stages), details=details)
