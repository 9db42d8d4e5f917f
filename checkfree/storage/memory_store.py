"""The run's side of an in-memory checkpoint: what it was taken at (progress, data position, RNG).

An in-memory checkpoint (``strategy=memory_checkpoint``) is a set of *snapshots* — every stage's weights and
Adam state, held in the RAM of peer nodes as held copies (``checkfree.plan.SNAPSHOT``) and moved by the
engines like any held copy. What the stages do not hold is the run's own position: the optimizer steps kept,
where the data stream was, the RNG. A real system keeps those few bytes with its coordinator; here the
trainer does, in a ``MemoryStore``, the in-memory counterpart of ``checkfree.storage.checkpoints.CheckpointStore``:
``commit`` a checkpoint's meta, ``restore`` the latest one, ``state_dict`` for a resume. It holds one
checkpoint: the snapshots are refreshed in place, so an older set no longer exists anywhere.
"""

from __future__ import annotations

import copy
from typing import Any

from checkfree.storage.checkpoints import NoReadableCheckpoint


class MemoryStore:
    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None
        self.saves = 0

    @property
    def progress(self) -> int | None:
        """Progress of the in-memory checkpoint the snapshots make, or None when there is none."""
        return None if self.latest is None else self.latest["progress"]

    def commit(self, meta: dict[str, Any]) -> None:
        """The snapshots were just refreshed at ``meta["progress"]``: remember the run's position for them (a
        copy: the data stream and the RNG go on changing)."""
        self.latest = copy.deepcopy(meta)
        self.saves += 1

    def restore(self) -> dict[str, Any]:
        """The meta of the in-memory checkpoint to roll back to (the stages restore their snapshots)."""
        if self.latest is None:
            raise NoReadableCheckpoint("no in-memory checkpoint was taken, so the run cannot roll back to one")
        return copy.deepcopy(self.latest)

    def clear(self) -> None:
        """No in-memory checkpoint is usable (a rollback to storage went back past it and took the lost stages'
        copies; or its snapshots are being refreshed, some already newer than the meta)."""
        self.latest = None

    def state_dict(self) -> dict[str, Any]:
        return {"latest": self.latest, "saves": self.saves}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latest, self.saves = state["latest"], state["saves"]


__all__ = ["MemoryStore"]
