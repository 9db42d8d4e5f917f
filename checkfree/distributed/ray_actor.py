"""A stage worker as a Ray actor: the same ``StageWorker`` and command loop as a stage process.

The actor runs ``worker.serve`` in one thread of its own, fed through a mailbox: ``call(message)`` puts
the command in and returns the worker's reply, so every command runs on the same thread (CUDA's current
device and the process group stay where the stage set them up). ``watch`` never returns: the pool holds
its result as the actor's sentinel, which Ray resolves with an error the moment the actor is gone (the
``ray.kill`` of an injected failure, the ``die`` command's ``os._exit``, a SIGKILL from outside, its node
lost).

An actor exists before it has a stage: created without one it is a *standby*, a process that has imported
torch and transformers and waits, so that a replacement on its node starts in a fraction of a second
instead of the seconds a fresh interpreter needs (the forkserver's role for local processes).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import ray
import torch

from checkfree.distributed.rendezvous import is_loopback
from checkfree.distributed.worker import StageWorker, WorkerSpec, serve


class Mailbox:
    """The control pipe's two methods that ``serve`` uses, between the actor's calls and its worker thread."""

    def __init__(self) -> None:
        self.commands: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()

    def recv(self) -> dict:
        return self.commands.get()

    def send(self, reply: dict) -> None:
        self.replies.put(reply)


@ray.remote(concurrency_groups={"commands": 1, "watch": 1})
class StageActor:
    """One replica of one stage; the pool calls ``start`` once, then ``call`` for every command."""

    def __init__(self) -> None:
        self.spec: WorkerSpec | None = None
        self.mailbox = Mailbox()
        self.thread: threading.Thread | None = None
        try:  # Ctrl-C goes to the supervisor, which stops the actors in order
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: Ray keeps the signal to itself then
            pass

    @ray.method(concurrency_group="commands")
    def start(self, spec: WorkerSpec) -> dict:
        """Build the stage (in the worker thread) and say hello: PID and the node this actor runs on."""
        self.spec = spec
        self.thread = threading.Thread(target=self._run, name=f"checkfree-stage{self.spec.stage}", daemon=True)
        self.thread.start()
        hello = self._reply()
        context = ray.get_runtime_context()
        return {**hello, "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}

    @ray.method(concurrency_group="commands")
    def call(self, message: dict) -> dict:
        self.mailbox.commands.put(dict(message))
        return self._reply()

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        threading.Event().wait()  # forever: only the actor's death resolves this call

    def _reply(self) -> dict:
        while True:
            try:
                return self.mailbox.replies.get(timeout=1.0)
            except queue.Empty:
                if self.thread is None or not self.thread.is_alive():
                    return {"error": f"stage {self.spec.stage}'s worker thread has stopped"}

    def _run(self) -> None:
        """As ``worker.main`` after the fork: environment, threads, the stage, hello, then the command loop."""
        spec = self.spec
        if is_loopback(spec.store_addr):  # gloo would otherwise pick the interface of the machine's hostname
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(spec.threads)
        start = time.perf_counter()
        try:
            worker = StageWorker(spec)
        except Exception as exc:
            self.mailbox.send({"error": f"building stage {spec.stage} failed: {type(exc).__name__}: {exc}"})
            return
        self.mailbox.send({"hello": True, "pid": os.getpid(), "build_s": time.perf_counter() - start})
        try:
            serve(self.mailbox, worker)
        finally:
            worker.close()

