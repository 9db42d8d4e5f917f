"""Bamboo's redundant computation run for real (``engine.shadows=compute``): each stage process computes its
successor's shadow instead of receiving a copy of it after every step.

Stage ``k``'s node keeps a shadow of stage ``j = k + 1 (mod S)`` (``RedundantComputation.shadow``). With
``engine.shadows=copy`` the owner sends its whole state to the holder after every step (what the engines did:
exact, but the bytes move, and an emulated run on shaped links pays for them). With ``compute`` the holder
runs the shadow as Bamboo does, so no byte of state moves after the first copy:

* *forward*: right after its own forward of micro-batch ``m`` (and after sending it on, so the pipeline does
  not wait for the shadow), stage ``k`` runs stage ``j``'s visit on its own output, which is stage ``j``'s input
  (the shadow of stage 0, kept by stage S-1, runs on the token ids; the shadow of stage S-1, kept by stage S-2,
  takes the head and the loss on the targets);
* *backward*: stage ``j + 1`` sends the gradient of its input (the gradient of stage ``j``'s output) to stage
  ``j`` and also to the shadow's holder ``k`` (one more message a micro-batch, on the link ``j + 1 -> k``); the
  shadow of stage S-1 starts from its own loss. Stage ``k`` runs the shadow's backward right after its own,
  micro-batch by micro-batch, except the shadow of stage 0, whose gradient comes from stage 1 only at the end
  of the backward pass: its backwards run after the program's last pass, in the same ascending order;
* *step*: the shadow clips on its own and steps its own Adam when the stages commit.

Same inputs, same ops, same order of accumulation, same thread count: the shadow's weights and Adam moments are
bitwise the owner's after every step (the tests compare them), so a restore from it is exact, as the copy was.
The first shadow of a stage (the setup's, or a recovery's for a replacement node, which kept none) is still
made by copying its owner: there is nothing to compute it from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from checkfree.distributed.programs import message_tag
from checkfree.plan import SHADOW, Held
from checkfree.stage.compute import StageCompute, causal_lm_loss
from checkfree.stage.routes import in_order

SHADOW_GRAD = 1 << 27
"""Tag offset of the gradient a stage sends a shadow's holder: above every activation tag of an iteration
(``programs.message_tag``) and below the shaper's arrival stamps (``STAMP``, 2**28)."""


def kept_by(k: int, n_stages: int) -> Held:
    """The shadow stage ``k``'s node keeps: of its successor, ``k + 1 (mod S)``."""
    return Held(SHADOW, (k + 1) % n_stages, k)


def holder_of_grad(i: int, n_stages: int) -> int:
    """Stage ``i``'s input gradient is the output gradient of stage ``i - 1``, whose shadow stage ``i - 2 (mod S)``
    keeps: where stage ``i`` sends it a second time."""
    return (i - 2) % n_stages


def grad_sender(k: int, n_stages: int) -> int:
    """The stage that sends stage ``k`` its shadow's output gradient: the one after the shadow's owner, ``k + 2
    (mod S)`` (``holder_of_grad``'s inverse)."""
    return (k + 2) % n_stages


def grad_tag(micro_batch: int, position: int, n_stages: int) -> int:
    """The tag of the gradient the visit at ``position`` sends a shadow's keeper for ``micro_batch``: its own input
    gradient's tag, moved into a range of its own (``SHADOW_GRAD``)."""
    return message_tag(micro_batch, position, True, n_stages) + SHADOW_GRAD


@dataclass
class Live:
    """A shadow as a stage its holder computes: the held copy it was made from (or last stepped into) and its
    compute."""

    held: dict[str, Any]
    compute: StageCompute


class Shadows:
    """The shadows this process computes, by the stage that keeps each one."""

    def __init__(self, n_stages: int, make: Any) -> None:
        self.n = n_stages
        self.make = make
        """``make(stage_index) -> StageCompute``: a stage with this process's device, lr, clip and precision."""
        self.live: dict[int, Live] = {}
        self.saved: dict[tuple[int, int], torch.Tensor] = {}
        """(keeper, micro-batch) -> the shadow's output (its loss, for the shadow of stage S-1), until its backward."""

    def start(self, held: dict[Held, dict[str, Any]], keepers: list[int]) -> None:
        """Before a step: every stage in ``keepers`` has a live shadow, (re)made from its held copy where that copy
        is new (a setup's or a recovery's refresh, a move, a resume), and its gradients zeroed."""
        for k in list(self.live):
            if k not in keepers:
                del self.live[k]
        for k in keepers:
            h = kept_by(k, self.n)
            copy = held.get(h)
            if copy is None:
                raise RuntimeError(f"engine.shadows=compute: stage {k} keeps no shadow of stage {h.owner} at this "
                                   "step (the setup's refresh makes one, and a recovery re-makes a lost holder's)")
            live = self.live.get(k)
            if live is None or live.held is not copy:
                compute = self.make(h.owner)
                compute.load_state(copy)  # copied in: the compute never writes into the copy it was made from
                live = self.live[k] = Live(copy, compute)
                held[h] = live.held = compute.state()  # the held copy is the live shadow's state from now on
            live.compute.train()
        self.saved.clear()

    def forward(self, k: int, m: int, own_output: torch.Tensor, tokens: Any, targets: Any,
                device: torch.device) -> None:
        """Stage ``k``'s shadow runs micro-batch ``m`` forward on what its owner gets: ``k``'s output, or the token
        ids for the shadow of stage 0; the shadow of stage S-1 ends in its loss on ``targets``."""
        live = self.live[k]
        j = kept_by(k, self.n).owner
        visit = in_order(self.n)[j]
        if visit.prev is None:
            x = torch.as_tensor(tokens).to(device)
        else:
            # A leaf that wants its gradient, as the owner's received input does: the same graph, so the same
            # gradients to the bit (and the work the clock prices: a whole backward).
            x = own_output.detach().requires_grad_(True)
        out = live.compute.forward(visit.ops, x)
        if visit.next is None:
            out = causal_lm_loss(out, torch.as_tensor(targets).to(device))
        self.saved[(k, m)] = out

    def backward(self, k: int, m: int, micro_batches: int, grad: Any) -> None:
        """The shadow's backward of micro-batch ``m``: from its loss, or from ``grad()`` (received from the stage
        after its owner)."""
        out = self.saved.pop((k, m))
        if kept_by(k, self.n).owner == self.n - 1:
            StageCompute.backward_loss(out, micro_batches)
        else:
            out.backward(grad(tuple(out.shape), out.dtype))

    def clip(self) -> None:
        for live in self.live.values():
            live.compute.clip()  # its own norm, as its owner clips its own: the same scale to the bit

    def step(self, held: dict[Held, dict[str, Any]]) -> None:
        """The owners stepped: so do their shadows, and the held copies are their states."""
        for k, live in self.live.items():
            live.compute.step()
            live.compute.drop_gradients()
            # Adam makes its moments at its first step: the held copy is re-read so it holds them.
            held[kept_by(k, self.n)] = live.held = live.compute.state()

    def drop(self) -> None:
        for live in self.live.values():
            live.compute.drop_gradients()
        self.saved.clear()


__all__ = ["SHADOW_GRAD", "Shadows", "grad_sender", "grad_tag", "holder_of_grad", "kept_by"]
