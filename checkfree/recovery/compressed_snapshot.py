"""Compressed snapshots: ``snapshot_restore`` with the lost stage's *weights* only, in bf16 or int8.

Every ``every`` iterations (``auto``: the smallest period the links sustain) each stage sends its weights,
encoded (``strategy.encoding``: ``bf16``, 2 bytes a parameter, or ``int8`` with one absmax scale per output
channel, 1 byte; ``checkfree.stage.encoding``), to the RAM of its next ``copies`` peers, in the background. That
is 1/6 (bf16) or 1/12 (int8) of the bytes ``snapshot_restore`` sends and holds for a whole state (fp32 weights
and Adam's two moments). A lost stage is restored from a surviving holder: its weights decoded (the copy's kind
names its encoding, and a restore decodes exactly that), a fresh Adam at ``lr_scale * lr`` — the moments were
not kept. When every copy died with the stage, CheckFree's rule rebuilds it (an edge by ``edge_rule``), as
``snapshot_restore`` does.
"""

from __future__ import annotations

from checkfree.plan import BYTES_PER_PARAM, SNAPSHOT_BF16, SNAPSHOT_INT8, Held, Rebuild, RunView
from checkfree.recovery.base import StrategyConfig
from checkfree.recovery.snapshot_restore import SnapshotRestore

KIND = {"bf16": SNAPSHOT_BF16, "int8": SNAPSHOT_INT8}


class CompressedSnapshot(SnapshotRestore):
    name = "compressed_snapshot"
    reads = (*SnapshotRestore.reads, "encoding")

    @property
    def snapshot_kind(self) -> str:
        return KIND[self.cfg.encoding]

    @classmethod
    def background_bytes_per_param(cls, cfg: StrategyConfig) -> float:
        return BYTES_PER_PARAM[cfg.encoding]

    def rebuild(self, k: int, lost: frozenset[int], view: RunView) -> Rebuild:
        holder = self.snapshot_holder(k, lost, view.n_stages)
        if holder is None:
            return super().rebuild(k, lost, view)  # its snapshots died with it: CheckFree's rule
        held = Held(self.snapshot_kind, k, holder)
        lr = self.cfg.lr_scale * view.base_lr
        return Rebuild(k, f"snapshot_{self.cfg.encoding}", self.fresh_seed(view, k), restore=held, lr=lr,
                       fetch=self.held_by(k, view.n_stages),
                       details={"staleness": view.progress - view.held_since[held], "lr": lr})
