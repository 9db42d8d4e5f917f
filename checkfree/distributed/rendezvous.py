"""Where the stage processes meet: one store made by the supervisor, one key prefix per generation.

The store belongs to the supervisor, the one process that never fails, so it survives any stage's death.
Each time the group is re-formed (a replacement joined) every worker leaves the old process group and
joins ``checkfree/<secret>/generation<g>`` of the same store: a fresh rendezvous with the same world size,
where no message or key of an older generation can be mistaken for a new one.

Who can reach it. torch's stores have no authentication, and a ``TCPStore`` answers anyone who connects --
``list_keys()`` included, which gives away every key and with it the per-run secret in them; any local user
could then call a generation off and end the run. So:

* **One machine** (``engine.launcher=processes``): a ``FileStore`` in a fresh private directory (mode 0700,
  ``open_file_store``), which only the run's user can open; nothing listens on the network.
* **Many machines** (Ray): a ``TCPStore`` on the driver node's address (never on every interface:
  ``engine.master_addr=0.0.0.0`` is refused, and torch's own master socket, which listens everywhere, is
  replaced by ours), with the per-run secret in every key (``new_secret``, handed to each worker at spawn).
  Any process that can connect to that address and port can read and write the run's rendezvous state: the
  network between the nodes must be trusted with it (a private network or VPN, or a firewall that admits only
  the cluster's nodes to the port).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from checkfree.run.config import EngineConfig, first_line


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


STORE_FILE = "store"


def open_file_store(timeout_s: float) -> tuple[dist.FileStore, Path]:
    """A rendezvous store only this user can reach: a file in a new directory that ``mkdtemp`` makes with mode
    0700. Returns the store and the file's path (for the workers; the caller removes its directory)."""
    directory = Path(tempfile.mkdtemp(prefix="checkfree-rendezvous-"))
    path = directory / STORE_FILE
    try:
        store = dist.FileStore(str(path), -1)  # -1: no count of clients, so no client ever deletes the file
        store.set_timeout(timedelta(seconds=timeout_s))
    except Exception as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise RendezvousError(f"cannot make the rendezvous store {path}: {first_line(exc)}.") from exc
    return store, path


def remove_file_store(path: str | Path | None) -> None:
    """The private directory of ``open_file_store``, with the store in it (nothing else is there)."""
    if path:
        shutil.rmtree(Path(path).parent, ignore_errors=True)


def connect_store(addr: str, port: int, timeout_s: float, who: str, path: str | None = None) -> dist.Store:
    """A client of the rendezvous store -- the file at ``path`` when the run has one, else the TCP store at
    ``addr:port`` -- with an error that names where it is."""
    try:
        if path:
            store = dist.FileStore(path, -1)
            store.set_timeout(timedelta(seconds=timeout_s))
            return store
        return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        raise RendezvousError(f"{who} could not reach the rendezvous store at {path or f'{addr}:{port}'} "
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
