"""Point to point between logical stages, whichever processes run them.

A worker runs one logical stage, or several after a shrink (``checkfree.simulation.placement``). What one stage sends
another goes over the process group when another process runs the receiver, and is handed over in memory
when this process runs both: the same call either way, so a program, a recovery or a refresh is written once
in terms of stages. A hand-over is a copy taken when it is sent (as a send reads its buffer then), so a later
in-place change of the sender's tensors never reaches the receiver: what the receiver gets is bitwise what it
would have got over the wire.

On emulated links (``engine.shape``: a ``Shaper``) every message to another process is booked on its link and
preceded by its arrival time; the receiver waits for it (``checkfree.transport.shaper``). A hand-over in this
process crosses no link and is not shaped.

Tags: an activation's tag (``programs.message_tag``) is unique in its iteration. A whole state's tag adds the
(sender, receiver) stage pair to its kind, because two stages of one process may each receive the same kind
from two stages of another; states of one kind between one pair arrive in the order they were sent.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

import torch
import torch.distributed as dist

from checkfree.stage.compute import clone_state
from checkfree.storage.checkpoints import nbytes
from checkfree.transport.shaper import STAMP, Shaper
from checkfree.transport.transfer import Pending, isend_state, recv_state

KINDS = 8
"""Kinds of whole-state transfer a tag has room for (``checkfree.stage.host``'s TAG_*: five used)."""


class Courier:
    def __init__(self, n_stages: int, wire: torch.device, device: torch.device, shaper: Shaper | None = None) -> None:
        self.n, self.wire, self.device = n_stages, wire, device
        self.shaper = shaper
        """The emulated links this process sends on (None: the transport's own speed)."""
        self.ranks: tuple[int, ...] = tuple(range(n_stages))
        """The rank of the process running each stage (this generation)."""
        self.me = 0
        """This process's rank."""
        self.box: defaultdict[tuple[int, int, Any], deque] = defaultdict(deque)
        """Hand-overs in this process: (from stage, to stage, tag or ("state", kind)) -> what was sent, oldest
        first."""

    def place(self, ranks: tuple[int, ...], me: int) -> None:
        self.ranks, self.me = tuple(ranks), me
        self.box.clear()  # nothing handed over in one generation is read in the next

    def here(self, stage: int) -> bool:
        return self.ranks[stage] == self.me

    # --- activations and gradients ------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, src: int, dst: int, tag: int, pending: Pending) -> None:
        if self.here(dst):
            self.box[(src, dst, tag)].append(tensor.detach().clone())
        else:
            wire = tensor.detach().to(self.wire)
            self._stamp(self.ranks[dst], tag, wire.numel() * wire.element_size(), pending)
            pending.add(wire, self.ranks[dst], tag)

    def recv(self, shape: tuple[int, ...], src: int, dst: int, tag: int,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor ``src`` sent ``dst``, as ``dtype`` on this process's compute device (over the wire it
        arrives in a buffer of that dtype; a hand-over is cast the same way)."""
        if self.here(src):
            return self.box[(src, dst, tag)].popleft().to(self.device, dtype)
        arrival = self._arrival(self.ranks[src], tag)
        x = torch.empty(shape, dtype=dtype, device=self.wire)
        dist.recv(x, src=self.ranks[src], tag=tag)
        self._wait(arrival)
        return x.to(self.device)

    # --- whole states ---------------------------------------------------------------------------------

    def state_tag(self, kind: int, src: int, dst: int) -> int:
        return kind + KINDS * (src * self.n + dst)

    def send_state(self, state: Any, src: int, dst: int, kind: int, pending: Pending) -> None:
        if self.here(dst):
            self.box[(src, dst, ("state", kind))].append(clone_state(state))
        else:
            self.post_state(state, self.ranks[dst], self.state_tag(kind, src, dst), pending)

    def recv_state(self, src: int, dst: int, kind: int) -> tuple[Any, int]:
        """The state ``src`` sent ``dst`` and its tensor bytes (a hand-over counts its bytes too: the records
        say what a stage read, wherever its source ran)."""
        if self.here(src):
            state = self.box[(src, dst, ("state", kind))].popleft()
            return state, nbytes(state)
        return self.take_state(self.ranks[src], self.state_tag(kind, src, dst))

    # --- whole states between processes, by rank (a stage that changes process: ``worker.move``) --------------

    def post_state(self, state: Any, dst_rank: int, tag: int, pending: Pending) -> None:
        self._stamp(dst_rank, tag, nbytes(state), pending)
        pending.extend(isend_state(state, dst_rank, tag, self.wire))

    def take_state(self, src_rank: int, tag: int) -> tuple[Any, int]:
        arrival = self._arrival(src_rank, tag)
        state, n_bytes = recv_state(src_rank, tag, self.wire, self.device)
        self._wait(arrival)
        return state, n_bytes

    # --- emulated links ------------------------------------------------------------------------------

    def _stamp(self, dst_rank: int, tag: int, n_bytes: int, pending: Pending) -> None:
        """Book ``n_bytes`` to ``dst_rank`` on the shaped link and send their arrival time ahead of them."""
        if self.shaper is None:
            return
        left, arrival = self.shaper.send_to(self.me, dst_rank, n_bytes)
        pending.add(Shaper.stamp(arrival, self.wire), dst_rank, tag + STAMP)
        pending.leave_by, pending.until = max(pending.leave_by, left), self.shaper.wait_until

    def _arrival(self, src_rank: int, tag: int) -> float | None:
        if self.shaper is None:
            return None
        stamp = Shaper.stamp(0.0, self.wire)
        dist.recv(stamp, src=src_rank, tag=tag + STAMP)
        return Shaper.read(stamp)

    def _wait(self, arrival: float | None) -> None:
        if arrival is not None:
            self.shaper.wait_until(arrival)


__all__ = ["Courier"]
