"""Moving tensors and whole state dicts between stage processes, point to point.

A state dict travels as three messages: the byte length of a pickled header (names, shapes, dtypes), the
header, then one flat buffer per dtype. The receiver needs to know nothing in advance, so the same two
functions carry neighbours' weights (CheckFree), a partner's weights and an embedding replica
(CheckFree+) and a stage's weights + Adam state (the redundant baseline's shadows).

Sends are ``isend``: a sender never waits for its receiver, so any set of transfers that every receiver
takes in a fixed order completes (the caller keeps the returned ``Pending`` until ``wait``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

State = dict[str, torch.Tensor]


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


def _sub_tag(tag: int, i: int) -> int:
    return tag * 8 + i


def isend_state(state: State, dst: int, tag: int, device: torch.device) -> Pending:
    """Send ``state`` to rank ``dst`` without waiting; the header says how to unpack it."""
    names = list(state)
    dtypes = list(dict.fromkeys(state[n].dtype for n in names))
    header = [(n, tuple(state[n].shape), str(state[n].dtype).removeprefix("torch.")) for n in names]
    payload = torch.frombuffer(bytearray(pickle.dumps(header)), dtype=torch.uint8).to(device)
    pending = Pending()
    pending.add(torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst, _sub_tag(tag, 0))
    pending.add(payload, dst, _sub_tag(tag, 1))
    for i, dtype in enumerate(dtypes):
        flat = torch.cat([state[n].detach().reshape(-1) for n in names if state[n].dtype == dtype])
        pending.add(flat.to(device), dst, _sub_tag(tag, 2 + i))
    return pending


def recv_state(src: int, tag: int, device: torch.device) -> tuple[State, int]:
    """Receive a state sent by ``isend_state`` from rank ``src``; returns it and the bytes received."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src=src, tag=_sub_tag(tag, 0))
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(payload, src=src, tag=_sub_tag(tag, 1))
    header = pickle.loads(payload.cpu().numpy().tobytes())
    dtypes = list(dict.fromkeys(dtype for _, _, dtype in header))
    state: State = {}
    nbytes = 0
    for i, dtype_name in enumerate(dtypes):
        dtype = getattr(torch, dtype_name)
        entries = [(n, shape) for n, shape, d in header if d == dtype_name]
        numels = [int(torch.Size(shape).numel()) for _, shape in entries]
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
        dist.recv(flat, src=src, tag=_sub_tag(tag, 2 + i))
        nbytes += flat.numel() * flat.element_size()
        for (name, shape), piece in zip(entries, torch.split(flat, numels)):
            state[name] = piece.view(shape)
    return state, nbytes


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[State, dict]:
    """An optimizer's state dict split into named tensors (``state.<param>.<slot>``) and the rest."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{slot}": v for i, slots in sd["state"].items() for slot, v in slots.items()
               if torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_state_from(tensors: State, rest: dict) -> dict:
    """The inverse of ``optimizer_tensors``: a dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, index, slot = name.split(".", 2)
        state.setdefault(int(index), {})[slot] = value.clone()
    return {"state": state, "param_groups": rest["param_groups"]}
