"""Where the stage processes meet: one TCP store hosted by the supervisor, one key prefix per generation.

The store lives in the supervisor, the one process that never fails, so it survives any stage's death.
Each time the group is re-formed (a replacement joined) every worker leaves the old process group and
joins ``checkfree/<secret>/generation<g>`` of the same store: a fresh rendezvous with the same world size,
where no message or key of an older generation can be mistaken for a new one.

Who can reach it: the store listens on ``engine.master_addr`` only (torch's own ``TCPStore`` master listens
on every interface, so we bind the socket and hand it over), which keeps a one-machine run on loopback. The
store has no authentication; what keeps a process the supervisor did not start out of a generation is the
per-run secret in every key, made by the supervisor (``new_secret``) and handed to each worker at spawn: a
process without it cannot name a single key of the run.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
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


def new_secret() -> str:
    """A run's rendezvous secret: 128 random bits, never written to the run directory or a log."""
    return secrets.token_hex(16)


def generation_prefix(secret: str, generation: int) -> str:
    """The key prefix of one generation of one run's process group."""
    return f"checkfree/{secret}/generation{generation}"


def open_store(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Host the rendezvous store on ``addr:port`` and nowhere else (port 0: any free port; ``store.port``
    tells which)."""
    try:
        listener = _listen(addr, port)
    except OSError as exc:
        raise _host_error(addr, port, exc.strerror or str(exc)) from exc
    port = listener.getsockname()[1]
    fd = listener.detach()  # the store owns the socket from here: it closes it when it goes
    try:
        return dist.TCPStore(addr, port, is_master=True, wait_for_workers=False,
                             timeout=timedelta(seconds=timeout_s), master_listen_fd=fd)
    except Exception as exc:
        try:
            os.close(fd)
        except OSError:  # the store had closed it already
            pass
        raise _host_error(addr, port, first_line(exc) or type(exc).__name__) from exc


def _listen(addr: str, port: int) -> socket.socket:
    """A listening socket bound to ``addr`` alone, as the store's own would be but for the address:
    SO_REUSEADDR, so that a port left in TIME_WAIT by an earlier run is free for it (preflight checks alike)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return listener


def _host_error(addr: str, port: int, cause: str) -> RendezvousError:
    hint = ("the port is already in use: pick another engine.master_port or 0 for a free one"
            if "in use" in cause.lower() else
            "engine.master_addr must be an address of this machine (127.0.0.1 for a single machine)")
    return RendezvousError(f"cannot host the rendezvous store on {addr}:{port}: {cause}; {hint}.")


def connect_store(addr: str, port: int, timeout_s: float, who: str) -> dist.TCPStore:
    """A client connection to the rendezvous store, with an error that names the address."""
    try:
        return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        raise RendezvousError(f"{who} could not reach the rendezvous store at {addr}:{port} "
                              f"({type(exc).__name__}: {first_line(exc)}).") from exc


def join_generation(store: dist.Store, generation: int, backend: str, rank: int, world_size: int,
                    timeout_s: float, secret: str) -> None:
    """Join generation ``generation`` of the process group (the caller has left the previous one)."""
    if not secret:
        raise RendezvousError(f"rank {rank} has no rendezvous secret: only a worker that its supervisor started "
                              "(which hands it the run's secret) can join a generation.")
    try:
        dist.init_process_group(backend, store=dist.PrefixStore(generation_prefix(secret, generation), store),
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        if not dist.is_initialized():
            # The failed attempt used up a process-group name (torch numbers them per process) and left no group
            # whose destruction would reset the count: reset it here, or this process's next generation would
            # look for its peers under a different name than a fresh replacement process does, and time out.
            dist.distributed_c10d._world.group_count = 0
        cause = first_line(exc).replace(secret, "<secret>")  # a store timeout names the keys it waited for
        raise RendezvousError(f"rank {rank} could not join generation {generation} of the {backend} process group "
                              f"({type(exc).__name__}: {cause}).") from exc
