"""``copy_next`` — a lost stage copies its next surviving stage (the right-hand neighbour).

The mirror image of the ``copy`` ablation, which takes the nearest surviving neighbour (the previous one on
a tie). A stage's blocks were trained to receive the previous stage's outputs, and the next stage's blocks to
receive theirs: copying forward rather than backward asks whether that direction matters. Edges, restart
(fresh optimizer at ``lr_scale * lr``) and everything else are CheckFree's.

It is also the worked example of the recipe for a new strategy: this module, one line in the registry
(``checkfree/recovery/__init__.py``), ``conf/strategy/copy_next.yaml`` and ``tests/test_copy_next.py``;
both engines run it without a line of their own.
"""

from __future__ import annotations

from checkfree.plan import Rebuild, RunView
from checkfree.recovery.checkfree import NeighbourRecovery


class CopyNext(NeighbourRecovery):
    name = "copy_next"

    def combine(self, k: int, left: int, right: int, view: RunView) -> Rebuild:
        return self.make(k, view, "copy", sources=((right, 1.0),))
