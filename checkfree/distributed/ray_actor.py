"""A stage worker as a Ray actor: the same ``worker.run`` (stage, hello, command loop) as a stage process.

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

import dataclasses
import queue
import signal
import threading

import ray

from checkfree.distributed import messages as msg
from checkfree.distributed.worker import WorkerSpec, run


class Mailbox:
    """The worker's ``Channel`` between the actor's calls and its worker thread."""

    def __init__(self) -> None:
        self.commands: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()

    def recv(self) -> msg.Command:
        return self.commands.get()

    def send(self, reply: msg.Reply) -> None:
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
    def start(self, spec: WorkerSpec) -> msg.Hello | msg.Failed:
        """Build the stage (in the worker thread) and say hello: PID and the node this actor runs on."""
        self.spec = spec
        self.thread = threading.Thread(target=run, args=(self.mailbox, spec), name=f"checkfree-stage{spec.stage}",
                                       daemon=True)
        self.thread.start()
        hello = self._reply()
        if not isinstance(hello, msg.Hello):
            return hello
        return dataclasses.replace(hello, node_id=ray.get_runtime_context().get_node_id(),
                                   node_ip=ray.util.get_node_ip_address())

    @ray.method(concurrency_group="commands")
    def call(self, command: msg.Command) -> msg.Reply:
        self.mailbox.commands.put(command)
        return self._reply()

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        threading.Event().wait()  # forever: only the actor's death resolves this call

    def _reply(self) -> msg.Reply:
        while True:
            try:
                return self.mailbox.replies.get(timeout=1.0)
            except queue.Empty:
                if self.thread is None or not self.thread.is_alive():
                    return msg.Failed(f"stage {self.spec.stage}'s worker thread has stopped")
