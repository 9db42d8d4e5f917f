"""Moving tensors and whole (nested) states between stage processes, point to point.

A state travels as three kinds of message: the byte length of its header, the header (the state's
structure as JSON, every tensor replaced by its shape and dtype, its plain values kept: ``headers``, never a
pickle, so no process that reaches the group can make a receiver run code), then one flat buffer per dtype.
The receiver needs to know nothing in advance, so the same two functions carry a neighbour's block weights
(CheckFree), a replica of the embedding (CheckFree+), a shadow with its optimizer state (redundant
computation) — every held copy in the one nested format of ``checkfree.plan``.

Sends are ``isend``: a sender never waits for its receiver, so any set of transfers that every receiver
takes in a fixed order completes (the caller keeps the returned ``Pending`` until ``wait``).

Tensors travel on the *wire device* (``wire_device``): the GPU under nccl, the CPU under gloo, whose send and
recv take CPU tensors only — so stage processes that share one GPU (NCCL refuses two ranks on one device)
run gloo and stage their CUDA tensors through host memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from checkfree.transport import headers


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where a process's point-to-point tensors must live for ``backend``: gloo sends and receives CPU tensors
    only (its CUDA support covers a few collectives, not send/recv); nccl sends from the GPU."""
    return torch.device("cpu") if backend == "gloo" else device


@dataclass
class Pending:
    """Sends in flight: the work handles and the buffers they read from (kept alive until ``wait``)."""

    works: list = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    leave_by: float = 0.0
    """On shaped links (``checkfree.transport.shaper``): the time the last of these sends has left its link;
    ``wait`` waits for it too (0: unshaped)."""
    until: Callable[[float], None] | None = None
    """The shaper's ``wait_until`` (its clock: the wall, or the process's own core: ``CoreClock``), set with
    ``leave_by``."""

    def add(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.works.append(dist.isend(tensor, dst=dst, tag=tag))
        self.buffers.append(tensor)

    def extend(self, other: Pending) -> None:
        self.works += other.works
        self.buffers += other.buffers
        self.leave_by = max(self.leave_by, other.leave_by)
        self.until = self.until or other.until

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.buffers = [], []
        if self.until is not None and self.leave_by > 0:
            self.until(self.leave_by)
        self.leave_by = 0.0


def _sub_tag(tag: int, i: int) -> int:
    return tag * 8 + i


def isend_state(state: Any, dst: int, tag: int, device: torch.device) -> Pending:
    """Send a (nested) state to rank ``dst`` without waiting; the header says how to unpack it."""
    header, tensors = headers.encode(state)
    dtypes = list(dict.fromkeys(t.dtype for t in tensors))
    payload = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)
    pending = Pending()
    pending.add(torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst, _sub_tag(tag, 0))
    pending.add(payload, dst, _sub_tag(tag, 1))
    for i, dtype in enumerate(dtypes):
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in tensors if t.dtype == dtype])
        pending.add(flat, dst, _sub_tag(tag, 2 + i))
    return pending


def recv_state(src: int, tag: int, device: torch.device, into: torch.device | None = None) -> tuple[Any, int]:
    """Receive a state sent by ``isend_state`` from rank ``src`` over ``device`` (the wire); returns it and the
    tensor bytes received. Tensors that lived on the CPU at the sender (e.g. Adam's step counts) are put back on
    the CPU, the others on ``into`` (default: ``device``), the receiver's compute device.

    A header that is not a valid one raises ``HeaderError`` before any tensor buffer is allocated."""
    into = device if into is None else into
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, tag=_sub_tag(tag, 0))
    try:
        payload = torch.empty(headers.check_length(int(size.item())), dtype=torch.uint8, device=device)
        dist.recv(payload, src=src, tag=_sub_tag(tag, 1))
        skeleton, entries = headers.decode(payload.cpu().numpy().tobytes())
    except headers.HeaderError as exc:
        raise headers.HeaderError(f"refused the state header from rank {src}: {exc}") from None
    dtypes = list(dict.fromkeys(dtype for _, dtype, _ in entries))
    tensors: list[torch.Tensor | None] = [None] * len(entries)
    nbytes = 0
    for i, dtype in enumerate(dtypes):
        mine = [j for j, (_, d, _) in enumerate(entries) if d == dtype]
        numels = [math.prod(entries[j][0]) for j in mine]
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
        dist.recv(flat, src=src, tag=_sub_tag(tag, 2 + i))
        nbytes += flat.numel() * flat.element_size()
        for j, piece in zip(mine, torch.split(flat, numels)):
            shape, _, on_cpu = entries[j]
            tensors[j] = piece.view(shape).cpu() if on_cpu else piece.view(shape).to(into)
    return headers.rebuild(skeleton, tensors), nbytes
