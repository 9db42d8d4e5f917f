"""Moving tensors and whole (nested) states between stage processes, point to point.

A state travels as three kinds of message: the byte length of a pickled header, the header (the state's
structure, with every tensor replaced by its name, shape and dtype, and its plain values kept), then one
flat buffer per dtype. The receiver needs to know nothing in advance, so the same two functions carry a
neighbour's block weights (CheckFree), a replica of the embedding (CheckFree+), a shadow with its optimizer
state (redundant computation) — every held copy in the one nested format of ``checkfree.plan``.

Sends are ``isend``: a sender never waits for its receiver, so any set of transfers that every receiver
takes in a fixed order completes (the caller keeps the returned ``Pending`` until ``wait``).

Tensors travel on the *wire device* (``wire_device``): the GPU under nccl, the CPU under gloo, whose send and
recv take CPU tensors only — so stage processes that share one GPU (NCCL refuses two ranks on one device)
run gloo and stage their CUDA tensors through host memory.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

_TENSOR = "__tensor__"


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where a process's point-to-point tensors must live for ``backend``: gloo sends and receives CPU tensors
    only (its CUDA support covers a few collectives, not send/recv); nccl sends from the GPU."""
    return torch.device("cpu") if backend == "gloo" else device


@dataclass
class Pending:
    """Sends in flight: the work handles and the buffers they read from (kept alive until ``wait``)."""

    works: list = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    nbytes: int = 0

    def add(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.works.append(dist.isend(tensor, dst=dst, tag=tag))
        self.buffers.append(tensor)
        self.nbytes += tensor.numel() * tensor.element_size()

    def extend(self, other: Pending) -> None:
        self.works += other.works
        self.buffers += other.buffers
        self.nbytes += other.nbytes

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.buffers = [], []


def flatten(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(skeleton, tensors): the structure with each tensor replaced by a placeholder, and the tensors by name."""
    if torch.is_tensor(state):
        return (_TENSOR, prefix), {prefix: state}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        skeleton = {}
        for key, value in state.items():
            skeleton[key], inner = flatten(value, f"{prefix}/{key!r}")
            tensors.update(inner)
        return skeleton, tensors
    if isinstance(state, list | tuple):
        items = []
        for i, value in enumerate(state):
            item, inner = flatten(value, f"{prefix}/{i}")
            items.append(item)
            tensors.update(inner)
        return type(state)(items), tensors
    return state, tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, tuple) and len(skeleton) == 2 and skeleton[0] == _TENSOR:
        return tensors[skeleton[1]]
    if isinstance(skeleton, dict):
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(unflatten(v, tensors) for v in skeleton)
    return skeleton


def _sub_tag(tag: int, i: int) -> int:
    return tag * 8 + i


def isend_state(state: Any, dst: int, tag: int, device: torch.device) -> Pending:
    """Send a (nested) state to rank ``dst`` without waiting; the header says how to unpack it."""
    skeleton, tensors = flatten(state)
    names = list(tensors)
    dtypes = list(dict.fromkeys(tensors[n].dtype for n in names))
    header = (skeleton, [(n, tuple(tensors[n].shape), str(tensors[n].dtype).removeprefix("torch."),
                          tensors[n].device.type) for n in names])
    payload = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8).to(device)
    pending = Pending()
    pending.add(torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst, _sub_tag(tag, 0))
    pending.add(payload, dst, _sub_tag(tag, 1))
    for i, dtype in enumerate(dtypes):
        flat = torch.cat([tensors[n].detach().reshape(-1).to(device) for n in names if tensors[n].dtype == dtype])
        pending.add(flat, dst, _sub_tag(tag, 2 + i))
    return pending


def recv_state(src: int, tag: int, device: torch.device, into: torch.device | None = None) -> tuple[Any, int]:
    """Receive a state sent by ``isend_state`` from rank ``src`` over ``device`` (the wire); returns it and the
    tensor bytes received. Tensors that lived on the CPU at the sender (e.g. Adam's step counts) are put back on
    the CPU, the others on ``into`` (default: ``device``), the receiver's compute device."""
    into = device if into is None else into
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, tag=_sub_tag(tag, 0))
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(payload, src=src, tag=_sub_tag(tag, 1))
    skeleton, entries = pickle.loads(payload.cpu().numpy().tobytes())
    dtypes = list(dict.fromkeys(dtype for _, _, dtype, _ in entries))
    tensors: dict[str, torch.Tensor] = {}
    nbytes = 0
    for i, dtype_name in enumerate(dtypes):
        mine = [(n, shape, where) for n, shape, d, where in entries if d == dtype_name]
        numels = [int(torch.Size(shape).numel()) for _, shape, _ in mine]
        flat = torch.empty(sum(numels), dtype=getattr(torch, dtype_name), device=device)
        dist.recv(flat, src=src, tag=_sub_tag(tag, 2 + i))
        nbytes += flat.numel() * flat.element_size()
        for (name, shape, where), piece in zip(mine, torch.split(flat, numels)):
            tensors[name] = piece.view(shape).cpu() if where == "cpu" else piece.view(shape).to(into)
    return unflatten(skeleton, tensors), nbytes
