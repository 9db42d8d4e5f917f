"""The distributed engine under ``torchrun``: one torchrun rank per stage (x replica), on one or more machines.

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m checkfree.distributed.launch --run-dir runs/a model=tiny strategy=checkfree failure=none

Rank ``r`` hosts replica ``r // S`` of stage ``r % S`` (world size must be ``S * engine.replicas``). Rank 0
is also the supervisor: it reads the Hydra overrides, loads the data, runs the trainer's loop and writes
``metrics.jsonl`` / ``summary.json`` into ``--run-dir``; its own stage runs in a thread beside it. Instead of
pipes, commands and replies travel through queues on torchrun's store (``MASTER_ADDR:MASTER_PORT``), the
same store the process group meets on. Activations, gradients and weights go point to point as always.

Failures: torchrun restarts *every* worker of the job when one dies (``--max-restarts``), so the
surviving stages' state that CheckFree rebuilds from is gone too; in-job recovery therefore needs the
supervisor-launched engine (``engine=distributed`` from ``python -m checkfree.train``). Under torchrun
``failure`` must be ``none``; a dead rank ends the job (torchrun stops the others), and a restarted job
starts the run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from checkfree.config import ConfigError
from checkfree.distributed.cluster import Handle, WorkerError, WorkerPool
from checkfree.distributed.rendezvous import is_loopback
from checkfree.distributed.supervisor import DistributedTrainer
from checkfree.distributed.worker import StageWorker, WorkerSpec, rank_of, serve

SPEC_KEY = "checkfree/spec/{rank}"
DOWN, UP = "checkfree/control/{rank}/down", "checkfree/control/{rank}/up"


class StoreChannel:
    """A duplex channel over two store queues, with the pipe methods the engine uses."""

    def __init__(self, store: dist.Store, out_key: str, in_key: str) -> None:
        self.store, self.out_key, self.in_key = store, out_key, in_key

    def send(self, message: Any) -> None:
        self.store.queue_push(self.out_key, pickle.dumps(message))

    def recv(self) -> Any:
        while True:
            try:
                return pickle.loads(self.store.queue_pop(self.in_key, block=True))
            except dist.DistStoreError:  # the store's timeout: nothing yet, keep waiting
                continue

    def poll(self) -> bool:
        return self.store.queue_len(self.in_key) > 0

    def close(self) -> None:
        pass


class RemoteProcess:
    """What the pool may ask of a process torchrun owns: it is alive until torchrun says otherwise."""

    exitcode = None
    sentinel = None

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def is_alive(self) -> bool:
        return True

    def join(self, timeout: float | None = None) -> None:
        pass

    kill = terminate = join


class StorePool(WorkerPool):
    """The pool over torchrun's ranks: specs and commands go through the store; nothing is spawned."""

    def __init__(self, spec: WorkerSpec, timeout_s: float, run_dir: Path, store: dist.Store) -> None:
        super().__init__(spec, timeout_s, run_dir)
        self.store = store

    def start(self) -> None:
        for stage in range(self.n_stages):
            for replica in range(self.replicas):
                rank = rank_of(stage, replica, self.n_stages)
                spec = dataclasses.replace(self.spec, stage=stage, replica=replica)
                self.store.set(SPEC_KEY.format(rank=rank), pickle.dumps(spec))
                channel = StoreChannel(self.store, DOWN.format(rank=rank), UP.format(rank=rank))
                self.handles[rank] = Handle(stage, replica, rank, RemoteProcess(-1), channel, -1)
        # Rank 0's own stage, beside the supervisor, on its own connection to the store.
        self.stage0 = threading.Thread(target=run_rank, args=(self.store.clone(), 0), daemon=True,
                                       name="checkfree-stage0")
        self.stage0.start()
        replies = self.request({r: None for r in self.handles}, "start", deadline=time.perf_counter() + 600)
        for rank, reply in replies.items():
            if "error" in reply:
                raise WorkerError(f"rank {rank} could not start: {reply['error']}")
            self.handles[rank].pid = reply["pid"]
        self.write_workers()
        self.rendezvous()

    def _wait(self, handles: list[Handle], timeout: float) -> tuple[list[Handle], list[Handle]]:
        deadline = time.perf_counter() + timeout
        while True:
            replied = [h for h in handles if h.conn.poll()]
            if replied or time.perf_counter() >= deadline:
                return replied, []  # a dead rank makes torchrun stop the whole job, this process included
            time.sleep(0.0005)

    def kill(self, stages: list[int]) -> float | None:
        raise ConfigError("failures cannot be injected under torchrun (it restarts every rank); use failure=none")

    def shutdown(self) -> None:
        """Every rank leaves its process group and returns (torchrun then sees a clean exit everywhere)."""
        if self.handles:
            self.request({r: {"cmd": "stop"} for r in self.handles}, "stop", deadline=time.perf_counter() + 30)
        if getattr(self, "stage0", None) is not None:
            self.stage0.join(30)
        self.handles = {}


class TorchrunTrainer(DistributedTrainer):
    def __init__(self, cfg, run_dir: Path, store: dist.Store) -> None:
        super().__init__(cfg, run_dir)
        self.store = store

    def make_pool(self) -> WorkerPool:
        return StorePool(self.worker_spec(), self.cfg.engine.timeout_s, self.run_dir, self.store)

    def worker_spec(self) -> WorkerSpec:
        spec = super().worker_spec()
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.model_cfg.n_stages * self.cfg.engine.replicas))
        threads = int(os.environ.get("CHECKFREE_THREADS", max(1, (os.cpu_count() or 1) // per_node)))
        return dataclasses.replace(spec, store_addr=addr, store_port=port, threads=threads)


def run_rank(store: dist.Store, rank: int) -> None:
    """A stage worker: wait for its spec on the store, build the stage, serve commands until ``stop``."""
    spec: WorkerSpec = pickle.loads(store.get(SPEC_KEY.format(rank=rank)))
    spec = dataclasses.replace(spec, local_rank=int(os.environ.get("LOCAL_RANK", rank)))
    channel = StoreChannel(store, UP.format(rank=rank), DOWN.format(rank=rank))
    if is_loopback(spec.store_addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if rank != 0:  # rank 0's stage shares the supervisor's process (and its thread settings)
        torch.set_num_threads(spec.threads)
    try:
        worker = StageWorker(spec)
    except Exception as exc:
        channel.send({"error": f"building stage {spec.stage} failed: {type(exc).__name__}: {exc}"})
        return
    channel.send({"hello": True, "pid": os.getpid(), "build_s": 0.0})
    try:
        serve(channel, worker)
    finally:
        worker.close()


def open_job_store(rank: int, timeout_s: float) -> dist.TCPStore:
    """torchrun's store: hosted by the elastic agent (TORCHELASTIC_USE_AGENT_STORE) or else by rank 0."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    return dist.TCPStore(addr, port, is_master=host, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="checkfree's distributed engine under torchrun")
    parser.add_argument("--run-dir", default=None, help="where rank 0 writes metrics.jsonl and summary.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m checkfree.train")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("checkfree.distributed.launch runs under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, "
                         "MASTER_PORT unset); on one machine use python -m checkfree.train engine=distributed.")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = open_job_store(rank, timeout_s=60)
    if rank != 0:
        run_rank(store, rank)
        return
    cfg = compose_run_config(args.overrides)
    expected = cfg.model.n_stages * cfg.engine.replicas
    if world != expected:
        raise ConfigError(f"torchrun started {world} processes but model.n_stages={cfg.model.n_stages} x "
                          f"engine.replicas={cfg.engine.replicas} needs {expected}; set --nproc-per-node/--nnodes.")
    if cfg.failure.name != "none":
        raise ConfigError(f"failure.name={cfg.failure.name!r} is not supported under torchrun: it restarts every "
                          "rank on a failure; use failure=none, or python -m checkfree.train engine=distributed.")
    run_dir = Path(args.run_dir or f"outputs/torchrun/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    summary = TorchrunTrainer(cfg, run_dir, store).run()
    print(f"{summary['status']}: {summary['iterations']} iterations, final val loss {summary['final_val_loss']}, "
          f"results in {run_dir}")


def compose_run_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from checkfree.runconfig import load_run_config
    from checkfree.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        engine = [] if any(o.startswith("engine=") for o in overrides) else ["engine=distributed"]
        cfg = compose(config_name="config", overrides=[*overrides, *engine])
    return load_run_config(cfg)


if __name__ == "__main__":
    main()
