"""The one representation of a micro-batch's path through the stages.

A schedule (``checkfree.stage.schedule``) says in which order the stage *bodies* run for micro-batch ``m``. The
route turns that order into *visits*: the embedding (owned by stage 0) runs first, the bodies in order, the
head (owned by stage S-1) last, and consecutive ops on one stage form one visit. Its input arrives from the
previous visit's stage (or is the token ids), its output goes to the next visit's stage (or into the loss).

In order, stage ``k`` has one visit per micro-batch; under CheckFree+'s swapped order (1, 0, 2, ..., S-1,
S-2) stage 0 visits twice (the embedding, then its body after stage 1) and so does stage S-1 (its body,
then the head after stage S-2). The local engine chains the visits in one process, the stage processes
each run their own visits and send the activations on, and the cost model prices each visit's compute and
each hop between visits: all three read the same ``route``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

EMBED, BODY, HEAD = "embed", "body", "head"


@dataclass(frozen=True)
class Visit:
    """One stage's contiguous part of a micro-batch's route."""

    stage: int
    ops: tuple[str, ...]
    """EMBED | BODY | HEAD, in order."""
    position: int
    """Index of this visit in the route."""
    prev: int | None
    """Stage whose output is this visit's input; None: the input is the token ids."""
    next: int | None
    """Stage that consumes this visit's output; None: the output is the logits and the loss is taken here."""


@lru_cache(maxsize=64)
def route(order: tuple[int, ...], n_stages: int) -> tuple[Visit, ...]:
    """The visits of a micro-batch whose bodies run in ``order`` (embedding first, head last)."""
    hops = [(0, EMBED), *((k, BODY) for k in order), (n_stages - 1, HEAD)]
    groups: list[tuple[int, list[str]]] = []
    for stage, op in hops:
        if groups and groups[-1][0] == stage:
            groups[-1][1].append(op)
        else:
            groups.append((stage, [op]))
    return tuple(
        Visit(stage, tuple(ops), i, groups[i - 1][0] if i > 0 else None,
              groups[i + 1][0] if i + 1 < len(groups) else None)
        for i, (stage, ops) in enumerate(groups)
    )


def body_visits(order: tuple[int, ...], n_stages: int) -> tuple[Visit, ...]:
    """The visits of ``order``'s route that are one stage's body alone, between two stages: their input and
    output are a pair of that stage's function, and the stages on either side (``prev``, ``next``) hold them
    (``checkfree.stage.fitting``). In order, every middle stage's visit; under CheckFree+'s swapped order also
    stage 0's body (between stages 1 and 2) and stage S-1's (between S-3 and S-2), while stage 1's and S-2's
    sit between one stage on both sides (0, and S-1)."""
    return tuple(v for v in route(order, n_stages) if v.ops == (BODY,) and v.prev is not None and v.next is not None)


def blame(op: str, stage: int, n_stages: int) -> int:
    """The stage an op's output is charged to: the embedding is stage 0's, the head stage S-1's."""
    return 0 if op == EMBED else n_stages - 1 if op == HEAD else stage


def in_order(n_stages: int) -> tuple[Visit, ...]:
    """The route of validation (and of every micro-batch of an in-order schedule)."""
    return route(tuple(range(n_stages)), n_stages)
