"""Where the stage processes meet: one TCP store hosted by the supervisor, one key prefix per generation.

The store lives in the supervisor, the one process that never fails, so it survives any stage's death.
Each time the group is re-formed (a replacement joined) every worker leaves the old process group and
joins ``checkfree/generation<g>`` of the same store: a fresh rendezvous with the same world size, where
no message or key of an older generation can be mistaken for a new one.
"""

from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from checkfree.config import EngineConfig, first_line


class RendezvousError(RuntimeError):
    """The store or the process group could not be set up; the message names address and port."""


def pick_backend(engine: EngineConfig, device: torch.device, world_size: int = 1) -> str:
    """engine.backend, with auto = nccl when every stage process of this machine gets a GPU of its own, else
    gloo: NCCL refuses two ranks on one GPU, and gloo carries the tensors of processes that share one through
    host memory (``transfer.wire_device``). Ray places its actors itself: there auto means nccl on a GPU."""
    shared = (device.type == "cuda" and engine.launcher == "processes"
              and torch.cuda.device_count() < world_size)
    if engine.backend != "auto":
        if engine.backend == "nccl" and device.type != "cuda":
            raise RendezvousError("engine.backend='nccl' needs CUDA devices (trainer.device=cuda or auto on a GPU "
                                  "machine); use engine.backend=gloo or auto on CPU.")
        if engine.backend == "nccl" and shared:
            raise RendezvousError(f"engine.backend='nccl' needs a GPU per stage process, and {world_size} processes "
                                  f"would share {torch.cuda.device_count()} GPU(s) (NCCL refuses two ranks on one "
                                  "GPU); use engine.backend=gloo or auto.")
        return engine.backend
    return "gloo" if shared or device.type != "cuda" else "nccl"


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def open_store(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Host the rendezvous store on ``addr:port`` (port 0: any free port; ``store.port`` tells which)."""
    try:
        return dist.TCPStore(addr, port, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        cause = first_line(exc) or type(exc).__name__
        hint = ("the port is already in use: pick another engine.master_port or 0 for a free one"
                if "in use" in cause.lower() else
                "engine.master_addr must be an address of this machine (127.0.0.1 for a single machine)")
        raise RendezvousError(f"cannot host the rendezvous store on {addr}:{port}: {cause}; {hint}.") from exc


def connect_store(addr: str, port: int, timeout_s: float, who: str) -> dist.TCPStore:
    """A client connection to the rendezvous store, with an error that names the address."""
    try:
        return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        raise RendezvousError(f"{who} could not reach the rendezvous store at {addr}:{port} "
                              f"({type(exc).__name__}: {first_line(exc)}).") from exc


def join_generation(store: dist.Store, generation: int, backend: str, rank: int, world_size: int,
                    timeout_s: float) -> None:
    """Join generation ``generation`` of the process group (the caller has left the previous one)."""
    try:
        dist.init_process_group(backend, store=dist.PrefixStore(f"checkfree/generation{generation}", store),
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        if not dist.is_initialized():
            # The failed attempt used up a process-group name (torch numbers them per process) and left no group
            # whose destruction would reset the count: reset it here, or this process's next generation would
            # look for its peers under a different name than a fresh replacement process does, and time out.
            dist.distributed_c10d._world.group_count = 0
        raise RendezvousError(f"rank {rank} could not join generation {generation} of the {backend} process group "
                              f"({type(exc).__name__}: {first_line(exc)}).") from exc
