"""A stage worker: the OS process (or Ray actor) of one node slot, hosting one replica of its pipeline stage —
or, after a shrink (``checkfree.simulation.placement``), several consecutive logical stages of the one pipeline, which
it then runs as one (``programs.host_program``; what its stages send each other is handed over in memory,
``courier``).

It builds its home stage exactly as the local engine does (same seeded init, so losses match), keeps it in a
``StageCompute`` (the per-stage compute every engine shares: precision rule, 1/M scaling, clipping,
stepping, rebuilding from a plan) and obeys the supervisor's commands, one typed command in, one typed reply
out (``messages``).
Activations, gradients and weights go to the other stages point to point over ``torch.distributed``; the
control channel carries only commands, token ids, plans and small replies.

An iteration is two-phase so that a failure can discard it everywhere: ``step`` runs the stage's program
(forwards and backwards of its visits, see ``programs``), all-reduces gradients over the stage's
data-parallel replicas and clips, then replies *ready* with its gradient norms; only ``commit`` steps the
optimizer. When a peer dies mid-iteration every blocked receive fails (gloo closes the dead peer's
connections) or times out after ``engine.timeout_s``; the worker drops its gradients, replies *aborted*
and waits for the supervisor to re-form the group.

Recovery: a worker is a ``checkfree.stage.host.StageHost`` — the plan executor and the bookkeeping of held copies
the local engine runs too — whose courier reaches the other processes: ``recover`` is the host's part of a
``RecoveryPlan``, ``upkeep`` re-makes held copies and writes checkpoint shards, ``move`` sends a stage whole
(``StageHost.pack``) to the worker that runs it now (a node that arrived takes its stage back).
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from checkfree.distributed import messages as msg
from checkfree.distributed.programs import host_program, message_tag, replica_micro_batches
from checkfree.distributed.rendezvous import connect_store, is_loopback, join_generation
from checkfree.distributed.rollcall import CalledOff, answer
from checkfree.distributed.shadows import Shadows, grad_sender, grad_tag, holder_of_grad
from checkfree.model.init_from import start_from
from checkfree.model.llama import Stage
from checkfree.model.presets import ModelConfig
from checkfree.run.config import first_line
from checkfree.simulation.networks import NetworkConfig
from checkfree.stage.compute import StageCompute, causal_lm_loss, per_sequence_loss
from checkfree.stage.host import TAG_MOVE, StageHost
from checkfree.stage.routes import blame, in_order, route
from checkfree.stage.schedule import build_schedule
from checkfree.storage.checkpoints import BackgroundWriter, CheckpointStore, DamagedCheckpoint, shard_bytes
from checkfree.transport.core_clock import CoreClock
from checkfree.transport.courier import Courier
from checkfree.transport.shaper import Shaper
from checkfree.transport.transfer import Pending, wire_device


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a stage process needs to build its stage and join the group."""

    stage: int
    replica: int
    model: ModelConfig
    """With the tokenizer's vocabulary size filled in."""
    seed: int
    lr: float
    clip: float
    precision: str
    device: str
    """'cpu' or 'cuda' (the worker takes cuda:<local rank % device_count>)."""
    schedule: str
    pipeline: str
    """'gpipe' or '1f1b' (in-order schedules only)."""
    micro_batches: int
    micro_batch_size: int
    replicas: int
    backend: str
    store_addr: str
    """The address the stage processes talk on (and the TCP store's, when the run has one)."""
    store_port: int
    timeout_s: float
    fresh: bool = False
    """A replacement process: its weights come from recovery, not from the seeded initialisation."""
    compile: bool = False
    """trainer.compile: the stage's training forward/backward through torch.compile."""
    threads: int = 1
    store_path: str | None = None
    """The rendezvous store's file, in a directory only the run's user can open (one-machine runs); None: the
    TCP store at store_addr:store_port."""
    local_rank: int | None = None
    """The process's index on its machine, for picking a GPU; None: rank % GPUs."""
    network: NetworkConfig | None = None
    """``engine.shape``: the network whose links every byte this process sends is shaped to
    (``checkfree.transport.shaper``); None: not shaped."""
    spread: bool = False
    """``engine.replica_placement=spread`` (where a shaped replica's links go)."""
    compute_time: str = "wall"
    """``engine.compute_time``: wall, or cpu (this process's time is its own core's: ``CoreClock``)."""
    shadows: str = "copy"
    """``engine.shadows``: copy (a shadow is its owner's state, sent after every step) | compute (the keeper
    computes it: ``checkfree.distributed.shadows``)."""
    buffer: int = 0
    """Micro-batches of activations each stage buffers for its neighbours' fitted rebuilds (``strategy.fit_buffer``
    of a fitting strategy; 0: none)."""
    secret: str = field(default="", repr=False)
    """The run's rendezvous secret (``rendezvous.new_secret``), set by the pool when it starts: it reaches a
    worker only in the spec it is spawned with, and never a log (``repr`` leaves it out)."""

    @property
    def n_stages(self) -> int:
        return self.model.n_stages

    @property
    def rank(self) -> int:
        return rank_of(self.stage, self.replica, self.n_stages)


def written_bytes(written: tuple[int, str]) -> int:
    """The bytes of a shard ``CheckpointStore.write_shard`` wrote (its answer: size, digest)."""
    return written[0]


def rank_of(stage: int, replica: int, n_stages: int) -> int:
    """Replica ``r`` of every stage forms pipeline ``r``: ranks ``r*S .. r*S + S-1`` (rank == stage for W=1)."""
    return replica * n_stages + stage


def seeded_stage(cfg: ModelConfig, seed: int, index: int) -> Stage:
    """Stage ``index`` exactly as ``model.build_stages(cfg, seed)[index]``: the stages before it are built
    and initialised too (one at a time), because they draw from the same generator first."""
    generator = torch.Generator().manual_seed(seed)
    for j in range(index):
        Stage(cfg, j).reset_parameters(generator)
    stage = Stage(cfg, index)
    stage.reset_parameters(generator)
    return start_from(stage, cfg, index)


def to_bytes(obj: Any) -> bytes:
    """A state for the control channel (resume, export): torch.save bytes, whatever the launcher."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class StageWorker(StageHost):
    """One process of the pipeline: the stage host of the logical stage(s) it runs (one, or several consecutive
    ones after a shrink), and the commands it serves."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.n = spec.n_stages
        if spec.device == "cuda":
            local = spec.local_rank if spec.local_rank is not None else spec.rank
            self.device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.wire = wire_device(spec.backend, self.device)
        """Where this process's point-to-point tensors travel (the CPU under gloo, whatever ``device`` is)."""
        self.shaper = None if spec.network is None else Shaper(spec.network, spec.n_stages, spec.spread)
        """This process's emulated links (``engine.shape``), None where they are not shaped."""
        super().__init__(spec.n_stages, Courier(spec.n_stages, self.wire, self.device, self.shaper), spec.buffer)
        self.courier.place(tuple(self.rank_of(k) for k in range(self.n)), spec.rank)
        stage = Stage(spec.model, spec.stage) if spec.fresh else seeded_stage(spec.model, spec.seed, spec.stage)
        self.computes[spec.stage] = self._compute(stage)  # its home stage, unless that moves away
        self.schedule = build_schedule(spec.schedule, self.n)
        self.store: dist.Store | None = None
        self.stage_group = None
        self.generation = -1
        self.writers: dict[int, BackgroundWriter] = {}
        """Per stage: persists its shard of an asynchronous checkpoint while training goes on."""
        self.core: CoreClock | None = None
        """``engine.compute_time=cpu``: this process's time (``start_clock``, in the thread that serves)."""
        self.shadows = Shadows(self.n, lambda j: self._compute(Stage(spec.model, j))) \
            if spec.shadows == "compute" else None
        """``engine.shadows=compute``: the successor's shadow this process computes (None: shadows are copied)."""

    def start_clock(self) -> CoreClock | None:
        """Under ``engine.compute_time=cpu``, start this process's core clock in the calling thread (the one that
        serves commands and computes) and give it to the shaper: every wait on a link jumps it from then on."""
        if self.spec.compute_time == "cpu" and self.shaper is not None:
            self.core = CoreClock()
            self.shaper.clock, self.shaper.sleep = self.core.now, self.core.sleep
        return self.core

    def rank_of(self, stage: int) -> int:
        return rank_of(stage, self.spec.replica, self.n)

    def held_bytes(self) -> dict[int, int]:
        return self.held_bytes_of()

    def _compute(self, stage: Stage) -> StageCompute:
        autocast = torch.bfloat16 if self.spec.precision == "bf16" else None
        return StageCompute(stage.to(self.device), self.spec.lr, self.spec.clip, autocast_dtype=autocast,
                            compile=self.spec.compile)

    # --- group membership ------------------------------------------------------------------------

    def rendezvous(self, command: msg.Rendezvous) -> msg.Joined | msg.Aborted:
        """Leave the old group (if any), join the command's generation, and take up the stages it gives this
        process: a stage new here starts fresh (a rebuild or a move fills it next)."""
        spec, generation = self.spec, command.generation
        self.leave_group()
        if self.store is None:
            self.store = connect_store(spec.store_addr, spec.store_port, spec.timeout_s, f"stage {spec.stage}",
                                       spec.store_path)
        try:
            answer(self.store, generation, command.world_size, spec.timeout_s, spec.secret)
        except CalledOff as exc:  # a peer was lost before all had answered: no group to wait for
            return msg.Aborted(str(exc))
        join_generation(self.store, generation, spec.backend, command.rank, command.world_size, spec.timeout_s,
                        spec.secret)
        if spec.replicas > 1:
            # Every rank creates every stage's group, in the same order (new_group is collective).
            for k in range(self.n):
                group = dist.new_group([rank_of(k, r, self.n) for r in range(spec.replicas)])
                if k == spec.stage:
                    self.stage_group = group
        self.courier.place(command.ranks, command.rank)
        for k in self.mine:
            if k not in self.computes:
                self.computes[k] = self._compute(Stage(spec.model, k))
        self.generation = generation
        return msg.Joined(generation)

    def move(self, command: msg.Move) -> msg.Moved:
        """Stages that change process: the sender sends each one's whole state (weights, Adam, lr, the copies it
        holds) and lets it go; the receiver takes it, bitwise."""
        received = self._hand_over(command.moves)
        for stage in [k for k in self.computes if not self.courier.here(k)]:
            self._let_go(stage)
        return msg.Moved(received)

    def resync(self, command: msg.Resync) -> msg.Moved:
        """A new process of a lost replica takes its stage's whole state from a surviving replica (which keeps it):
        bitwise the state every replica of the stage has, since they step together."""
        return msg.Moved(self._hand_over(command.copies))

    def _hand_over(self, transfers: tuple[tuple[int, int, int], ...]) -> int:
        """``(stage, from rank, to rank)``: the sender sends the stage whole (``pack``), the receiver takes it
        (``unpack``), every send posted before any receive; returns the bytes this process received."""
        pending, received = Pending(), 0
        for stage, src, dst in transfers:
            if src == self.courier.me and stage in self.computes:
                self.courier.post_state(self.pack(stage), dst, self.courier.state_tag(TAG_MOVE, stage, stage), pending)
        for stage, src, dst in transfers:
            if dst == self.courier.me:
                state, n_bytes = self.courier.take_state(src, self.courier.state_tag(TAG_MOVE, stage, stage))
                self.unpack(stage, state)
                received += n_bytes
        pending.wait()
        return received

    def _let_go(self, stage: int) -> None:
        del self.computes[stage]
        self.forget(stage)
        writer = self.writers.pop(stage, None)
        if writer is not None:
            writer.close()

    # --- one iteration ---------------------------------------------------------------------------

    def step(self, command: msg.Step) -> msg.Ready | msg.Aborted:
        if self.ring is not None:
            self.ring.discard()  # what an aborted or failed step noted: only a committed step keeps its notes
        for k in self.mine:
            self.computes[k].train()
        if self.shadows is not None:  # outside the try: a shadow missing here is a fault, not a lost peer
            self.shadows.start(self.held, self.mine)
        try:
            loss_sum, tokens = self._run_program(command.inputs, command.targets, command.step)
            self._allreduce_gradients()
        except Exception as exc:  # a lost peer (connection closed) or a timeout: discard the iteration
            for k in self.mine:
                self.computes[k].drop_gradients()
            if self.shadows is not None:
                self.shadows.drop()
            self.leave_group()
            return msg.Aborted(f"{type(exc).__name__}: {first_line(exc)}")
        norms = {k: self.computes[k].clip() for k in self.mine}
        if self.shadows is not None:
            self.shadows.clip()
        return msg.Ready(loss_sum, tokens, {k: pre for k, (pre, _) in norms.items()},
                         {k: post for k, (_, post) in norms.items()})

    def commit(self, command: msg.Commit) -> msg.Committed:
        for k in self.mine:
            self.computes[k].step()
            self.computes[k].drop_gradients()  # a stage process holds nothing between iterations it need not
        if self.shadows is not None:
            self.shadows.step(self.held)
        if self.ring is not None:
            self.ring.commit(command.last_seq)
        return msg.Committed(self.lrs(), {k: self.computes[k].finite() for k in self.mine},
                             self.held_bytes() if self.ring is not None else {})

    def abort(self, command: msg.Abort) -> msg.Done:
        for k in self.mine:
            self.computes[k].drop_gradients()
        if self.shadows is not None:
            self.shadows.drop()
        return msg.Done()

    def _run_program(self, inputs: dict[int, np.ndarray], targets: dict[int, np.ndarray],
                     step: int) -> tuple[float, int]:
        spec, courier = self.spec, self.courier
        mbs = replica_micro_batches(spec.micro_batches, spec.replicas, spec.replica)
        program = host_program(self.mine, self.schedule, mbs, spec.pipeline)
        shape = (spec.micro_batch_size, spec.model.seq_len, spec.model.d_model)
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        pending = Pending()
        loss_sum, tokens = 0.0, 0
        shadows = self.shadows

        def shadow_grad(k: int, m: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            sender = in_order(self.n)[grad_sender(k, self.n)]  # the visit after the shadow's owner's
            return courier.recv(shape, sender.stage, k, grad_tag(m, sender.position, self.n), dtype)

        for p in program:
            m, v = p.micro_batch, p.visit
            compute = self.computes[v.stage]
            if not p.backward:
                visits, seq = route(self.schedule.order(m), self.n), step * spec.micro_batches + m
                if v.prev is None:
                    x, leaf = torch.as_tensor(inputs[m]).to(self.device), None
                else:
                    x = courier.recv(shape, v.prev, v.stage, message_tag(m, v.position - 1, False, self.n))
                    self.note_received(v, visits[v.position - 1], seq, x)
                    leaf = x.requires_grad_(True)
                out = compute.forward(v.ops, x)
                if v.next is None:
                    target = torch.as_tensor(targets[m]).to(self.device)
                    out = causal_lm_loss(out, target)
                    loss_sum += out.item()
                    tokens += target.numel()
                else:
                    courier.send(out, v.stage, v.next, message_tag(m, v.position, False, self.n), pending)
                    self.note_sent(v, visits[v.position + 1], seq, out)
                saved[(m, v.position)] = (leaf, out)
                if shadows is not None:  # after the send: the next stage never waits for the shadow
                    shadows.forward(v.stage, m, out, inputs.get(m), targets.get(m), self.device)
            else:
                leaf, out = saved.pop((m, v.position))
                if v.next is None:
                    StageCompute.backward_loss(out, spec.micro_batches)
                else:
                    grad = courier.recv(tuple(out.shape), v.next, v.stage,
                                        message_tag(m, v.position + 1, True, self.n), out.dtype)
                    out.backward(grad)
                if leaf is not None:
                    courier.send(leaf.grad, v.stage, v.prev, message_tag(m, v.position, True, self.n), pending)
                    if shadows is not None:  # the same gradient for the shadow of the stage before
                        courier.send(leaf.grad, v.stage, holder_of_grad(v.stage, self.n),
                                     grad_tag(m, v.position, self.n), pending)
                if shadows is not None and v.stage != self.n - 1:  # the shadow of stage 0 waits for stage 1: below
                    shadows.backward(v.stage, m, spec.micro_batches,
                                     lambda shape, dtype, k=v.stage, m=m: shadow_grad(k, m, shape, dtype))
        if shadows is not None and self.n - 1 in self.mine:
            for m in mbs:  # ascending, as stage 0 accumulates its own
                shadows.backward(self.n - 1, m, spec.micro_batches,
                                 lambda shape, dtype, m=m: shadow_grad(self.n - 1, m, shape, dtype))
        pending.wait()
        return loss_sum, tokens

    def _allreduce_gradients(self) -> None:
        """Sum the replicas' gradients (each already scaled by 1/M, so the sum is the local engine's)."""
        if self.stage_group is None:
            return
        params = list(self.computes[self.spec.stage].stage.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.wire)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.stage_group)
        if self.core is not None:  # the ring starts when the last replica's own clock has reached it
            joined = torch.tensor([self.core.now()], dtype=torch.float64, device=self.wire)
            dist.all_reduce(joined, op=dist.ReduceOp.MAX, group=self.stage_group)
            self.core.catch_up(float(joined.item()))
        if self.shaper is not None:  # done when the last replica joined: the ring over the emulated links starts then
            self.shaper.sleep(self.shaper.allreduce_seconds(flat.numel() * flat.element_size(), self.spec.stage,
                                                            self.spec.replicas))
        for p, piece in zip(params, torch.split(flat, [g.numel() for g in grads])):
            p.grad = piece.view_as(p).to(p.device, copy=True)

    # --- validation ------------------------------------------------------------------------------

    @torch.no_grad()
    def eval(self, command: msg.Eval) -> msg.Evaluated:
        """In-order forward of the held-out sequences (replica 0 of every stage takes part); the process that
        runs the last stage also reports each sequence's loss when ``per_sequence``."""
        inputs, targets, n, batch_size = command.inputs, command.targets, command.n, command.batch_size
        visits = [v for v in in_order(self.n) if self.courier.here(v.stage)]
        for v in visits:
            self.computes[v.stage].stage.eval()
        total, count, sequences = 0.0, 0, []
        pending = Pending()
        for b, start in enumerate(range(0, n, batch_size)):
            size = min(batch_size, n - start)
            for visit in visits:
                if visit.prev is None:
                    x = torch.as_tensor(inputs[start:start + size]).to(self.device)
                else:
                    x = self.courier.recv((size, self.spec.model.seq_len, self.spec.model.d_model), visit.prev,
                                          visit.stage, message_tag(b, visit.position - 1, False, self.n))
                out = self.computes[visit.stage].forward(visit.ops, x)
                if visit.next is None:
                    target = torch.as_tensor(targets[start:start + size]).to(self.device)
                    if command.per_sequence:
                        sequences += per_sequence_loss(out, target).tolist()
                    else:
                        total += causal_lm_loss(out, target).item() * size
                    count += size
                else:
                    self.courier.send(out, visit.stage, visit.next,
                                      message_tag(b, visit.position, False, self.n), pending)
        pending.wait()
        return msg.Evaluated(total, count, sequences)

    @torch.no_grad()
    def probe(self, command: msg.Probe) -> msg.Probed:
        """Forward one micro-batch of ``size`` sequences along ``order``; report, per op, whether its output is
        finite (a diagnosis of a non-finite loss: whose output went bad first)."""
        order, inputs, size = command.order, command.inputs, command.size
        outputs, index, pending = [], 0, Pending()
        for v in route(order, self.n):
            if not self.courier.here(v.stage):
                index += len(v.ops)
                continue
            if v.prev is None:
                h = torch.as_tensor(inputs).to(self.device)
            else:
                h = self.courier.recv((size, self.spec.model.seq_len, self.spec.model.d_model), v.prev, v.stage,
                                      message_tag(0, v.position - 1, False, self.n))
            h, finite = self.computes[v.stage].probe(v.ops, h)
            for op, ok in finite:
                outputs.append((index, blame(op, v.stage, self.n), ok))
                index += 1
            if v.next is not None:
                self.courier.send(h, v.stage, v.next, message_tag(0, v.position, False, self.n), pending)
        pending.wait()
        return msg.Probed(outputs)

    # --- recovery --------------------------------------------------------------------------------

    def recover_command(self, command: msg.Recover) -> msg.Recovered:
        """This process's part of the plan (``StageHost.recover``); replies the bytes each rebuilt stage read."""
        received, fitted = self.recover(command.plan)
        return msg.Recovered(received, self.lrs(), self.held_bytes(), fitted)

    def upkeep(self, command: msg.Upkeep) -> msg.KeptUp:
        """Re-make held copies; write this process's stages' checkpoint shards into ``checkpoint`` (replica 0
        writes) — ``in_background``: copy them to host memory, reply, and let each stage's writer thread persist
        its shard while training goes on (``flushed`` waits for them)."""
        got = self.refresh(command.refresh)
        received = [((h.kind, h.owner, h.holder), n) for h, n in got.items()]
        checkpoint = command.checkpoint
        if checkpoint is None or self.spec.replica != 0:
            return msg.KeptUp(received, self.held_bytes())
        sizes, digests = {}, {}
        for k in self.mine:
            if command.in_background:
                state = self.stage_for_background(k)
                writer = self.writers.setdefault(k, BackgroundWriter())
                began = self._link_time()  # handed over now, written later
                writer.submit(lambda k=k, state=state, began=began: self._over_storage(
                    lambda: CheckpointStore.write_shard(Path(checkpoint), k, state), written_bytes, began))
                sizes[k] = self.staged[k]
            else:
                sizes[k], digests[k] = self._over_storage(
                    lambda k=k: CheckpointStore.write_shard(Path(checkpoint), k, self.computes[k].state()),
                    written_bytes)
        return msg.KeptUp(received, self.held_bytes(), sizes, digests)

    def _over_storage(self, job: Any, n_bytes: Any, began: float | None = None) -> Any:
        """Run ``job``, a write or read of checkpoint shards; on shaped links it lasts at least the time its bytes
        (``n_bytes(result)``) take on this node's link to storage from when it began (now, or ``began``: when a
        background flush was handed to its writer; the disk's own time overlaps them)."""
        if began is None:
            began = self._link_time()
        result = job()
        if self.shaper is not None:
            self.shaper.wait_until(self.shaper.storage(n_bytes(result), began))
        return result

    def _link_time(self) -> float:
        """Now, on the clock the shaper books links by (the wall's, or this process's core's); 0 unshaped."""
        return self.shaper.clock() if self.shaper is not None else 0.0

    def flushed(self, command: msg.Flushed) -> msg.Persisted:
        """The digests of the shards this process's stages persisted in the background, once written."""
        digests = {}
        for k in self.mine:
            result = self.writers[k].wait() if k in self.writers else None
            if result is not None:
                digests[k] = result[1]
        if self.core is not None:  # the flush's bytes were on the storage link until then
            self.core.settle()
        return msg.Persisted(digests)

    def load(self, command: msg.Load) -> msg.Loaded | msg.Damaged:
        """Roll back to this process's stages' shards of ``checkpoint`` (a replacement downloads them the same
        way). Every shard is read (and verified) before any is applied."""
        try:
            # Read onto the CPU, as the local engine does: load_state moves the weights and Adam's moments to
            # the stage's device, while Adam's step counts stay on the CPU, where Adam keeps them (read onto a
            # GPU they would stay there, and every step would wait on the GPU to read each one back).
            shards = self._over_storage(  # downloaded from storage
                lambda: {k: CheckpointStore.read_shard(Path(command.checkpoint), k, {"digests": command.meta_digests})
                         for k in self.mine},
                lambda read: sum(shard_bytes(shard) for shard in read.values()))
        except DamagedCheckpoint as exc:
            return msg.Damaged(str(exc.path), exc.cause)
        for k, shard in shards.items():
            self.computes[k].load_state(shard)
        for k in set(command.lost) & set(shards):
            self.forget(k)
        return msg.Loaded(self.lrs(), self.held_bytes())

    # --- whole state: resume and export ----------------------------------------------------------

    def get_state(self, command: msg.GetState) -> msg.State:
        return msg.State(to_bytes({k: self.pack(k) for k in self.mine}), self.generation)

    def set_state(self, command: msg.SetState) -> msg.StateSet:
        loaded = from_bytes(command.state)
        for k in self.mine:
            # Only replica 0 writes checkpoints, so only it has a staging buffer.
            self.unpack(k, loaded[k], staged=self.spec.replica == 0)
        return msg.StateSet(self.lrs(), self.held_bytes())

    # --- lifecycle -------------------------------------------------------------------------------

    def die(self, command: msg.Die) -> None:
        os._exit(command.code)  # a real, abrupt exit: no cleanup, no reply, connections closed by the kernel

    def leave_group(self) -> None:
        """Close every connection of this generation at once. A peer blocked on a receive from *us* then
        fails immediately instead of waiting out the timeout, so one death aborts the whole iteration fast.
        The supervisor re-forms the group before any further traffic."""
        self.stage_group = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # already broken: nothing left to close
                pass

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.leave_group()

    def handle(self, command: msg.Command) -> msg.Reply:
        """One command: its reply, or the error it raised (after leaving the group, so no peer waits on us)."""
        try:
            handler = HANDLERS[type(command)]
        except KeyError:
            return msg.Failed(f"stage {self.spec.stage} has no handler for {command!r}")
        try:
            return handler(self, command)
        except Exception as exc:
            self.leave_group()
            return msg.Failed(f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=8))


HANDLERS = {msg.Rendezvous: StageWorker.rendezvous, msg.Step: StageWorker.step, msg.Commit: StageWorker.commit,
            msg.Abort: StageWorker.abort, msg.Eval: StageWorker.eval, msg.Probe: StageWorker.probe,
            msg.Move: StageWorker.move, msg.Resync: StageWorker.resync, msg.Recover: StageWorker.recover_command, msg.Upkeep: StageWorker.upkeep,
            msg.Flushed: StageWorker.flushed, msg.Load: StageWorker.load, msg.GetState: StageWorker.get_state,
            msg.SetState: StageWorker.set_state, msg.Die: StageWorker.die}
"""The method that serves each command (``Stop`` ends ``serve``'s loop instead)."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphans, whatever kills the parent)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class Channel(Protocol):
    """The worker's end of the control channel: a pipe's end for a local process, the actor's mailbox on Ray."""

    def recv(self) -> msg.Command: ...

    def send(self, reply: msg.Reply) -> None: ...


def run(channel: Channel, spec: WorkerSpec) -> None:
    """A stage worker's life, whatever started it (``main`` for a local process, ``ray_actor`` for an actor):
    process-wide settings, the stage, hello, then commands until ``Stop`` or the supervisor is gone."""
    if is_loopback(spec.store_addr):  # gloo would otherwise pick the interface of the machine's hostname
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    try:
        worker = StageWorker(spec)
    except Exception as exc:
        channel.send(msg.Failed(f"building stage {spec.stage} failed: {type(exc).__name__}: {exc}"))
        return
    channel.send(msg.Hello(os.getpid(), time.perf_counter() - start))
    try:
        serve(channel, worker)
    finally:
        worker.close()


def main(conn: Any, spec: WorkerSpec) -> None:
    """Entry point of a local stage process: dies with its parent, leaves Ctrl-C to the supervisor (which
    stops the workers in order), then ``run``."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run(conn, spec)


def serve(channel: Channel, worker: StageWorker) -> None:
    core = worker.start_clock()
    while True:
        try:
            command = channel.recv()
        except (EOFError, OSError):  # the supervisor is gone
            return
        if isinstance(command, msg.Timed):  # engine.compute_time=cpu: nothing here happens before what it follows
            if core is not None:
                core.catch_up(command.at)
            command = command.body
        if isinstance(command, msg.Stop):
            worker.close()  # leave the group before saying so: the supervisor may exit right after
            channel.send(msg.Done())
            return
        reply = worker.handle(command)
        if core is not None:
            reply = msg.Timed(core.now(), reply)
        try:
            channel.send(reply)
        except (BrokenPipeError, OSError):
            return
