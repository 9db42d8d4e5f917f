"""Micro-batch forward orders.

A schedule answers one question: for micro-batch ``m``, in which order do the stages run?
The answer is a tuple of stage indices by position. The embedding (owned by stage 0) always runs
first and the head (owned by stage S-1) always runs last, whatever the order of the bodies.

* ``InOrder`` — every micro-batch runs 0, 1, ..., S-1.
* ``OutOfOrder`` — CheckFree+: odd micro-batches swap the positions of stages 0<->1 and S-2<->S-1,
  so each edge stage's neighbour also learns to do the edge stage's job.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InOrder:
    n_stages: int
    name: str = "in_order"

    def order(self, micro_batch: int) -> tuple[int, ...]:
        return tuple(range(self.n_stages))


@dataclass(frozen=True)
class OutOfOrder:
    n_stages: int
    name: str = "out_of_order"

    def __post_init__(self) -> None:
        if self.n_stages < 4:
            raise ValueError(
                f"model.n_stages={self.n_stages} is too small for out-of-order pipelining: "
                "CheckFree+ swaps stages 0<->1 and S-2<->S-1, which needs at least 4 stages."
            )

    def order(self, micro_batch: int) -> tuple[int, ...]:
        return swapped_order(self.n_stages) if micro_batch % 2 == 1 else tuple(range(self.n_stages))


def swapped_order(n_stages: int) -> tuple[int, ...]:
    """Positions of the odd micro-batches: (1, 0, 2, ..., S-3, S-1, S-2)."""
    order = list(range(n_stages))
    order[0], order[1] = order[1], order[0]
    order[-2], order[-1] = order[-1], order[-2]
    return tuple(order)


Schedule = InOrder | OutOfOrder

SCHEDULES = {"in_order": InOrder, "out_of_order": OutOfOrder}


def build_schedule(name: str, n_stages: int) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; allowed: {sorted(SCHEDULES)}.")
    return SCHEDULES[name](n_stages)
