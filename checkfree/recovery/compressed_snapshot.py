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

from checkfree.plan import BYTES_PER_PARAM, SNAPSHOT_BF16, SNAPSHOT_INT8, RunView
from checkfree.recovery.base import StrategyConfig
from checkfree.recovery.snapshot_restore import SnapshotRestore

KIND = {"bf16": SNAPSHOT_BF16, "int8": SNAPSHOT_INT8}


class CompressedSnapshot(SnapshotRestore):
    name = "compressed_snapshot"
    reads = (*SnapshotRestore.reads, "encoding")

    @property
    def snapshot_kind(self) -> str:
        return KIND[self.cfg.encoding]

    @property
    def snapshot_method(self) -> str:
        return f"snapshot_{self.cfg.encoding}"

    def restored_lr(self, view: RunView) -> float:
        """A fresh Adam at ``lr_scale * lr``: the snapshot kept no optimizer state."""
        return self.cfg.lr_scale * view.base_lr

    @classmethod
    def background_bytes_per_param(cls, cfg: StrategyConfig) -> float:
        return BYTES_PER_PARAM[cfg.encoding]
