"""A stage worker: the OS process that hosts one replica of one pipeline stage.

It builds its stage exactly as the local engine does (same seeded init, so losses match), keeps its own
Adam (a one-stage ``LocalPipeline``, which also gives the local engine's per-stage clipping), and obeys
the supervisor's commands on its control pipe. Activations, gradients and weights go to the other
stages point to point over ``torch.distributed``; the pipe carries only commands, token ids and small
replies.

An iteration is two-phase so that a failure can discard it everywhere: ``step`` runs the stage's program
(forwards and backwards of its visits, see ``routes``), all-reduces gradients over the stage's data-parallel
replicas and clips, then replies *ready* with its gradient norms; only ``commit`` steps the optimizer.
When a peer dies mid-iteration every blocked receive fails (gloo closes the dead peer's connections) or
times out after ``engine.timeout_s``; the worker drops its gradients, replies *aborted* and waits for the
supervisor to re-form the group.

The worker dies with its supervisor: the kernel sends it SIGKILL when its parent goes (Linux), and it
exits when the control pipe closes. Ctrl-C is left to the supervisor, which stops workers in order.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from checkfree.atomic import torch_save_atomic
from checkfree.distributed.rendezvous import connect_store, is_loopback, join_generation
from checkfree.distributed.routes import message_tag, replica_micro_batches, route, stage_program
from checkfree.distributed.transfer import (
    Pending,
    isend_state,
    optimizer_state_from,
    optimizer_tensors,
    recv_state,
)
from checkfree.model import ModelConfig, Stage
from checkfree.pipeline import LocalPipeline, causal_lm_loss
from checkfree.recovery.averaging import weighted_state
from checkfree.recovery.base import optimizer_state_bytes, state_bytes
from checkfree.schedule import build_schedule

# Tags of whole-state transfers (activation tags come from routes.message_tag and never collide with
# these: each kind of traffic runs in its own command).
TAG_BODY, TAG_EDGE, TAG_SHADOW, TAG_REFRESH = 1, 2, 3, 4


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
    """'cpu' or 'cuda' (the worker takes cuda:<rank % device_count>)."""
    schedule: str
    pipeline: str
    """'gpipe' or '1f1b' (in-order schedules only)."""
    micro_batches: int
    micro_batch_size: int
    replicas: int
    backend: str
    store_addr: str
    store_port: int
    timeout_s: float
    run_dir: str
    fresh: bool = False
    """A replacement process: its weights come from recovery, not from the seeded initialisation."""
    threads: int = 1
    local_rank: int | None = None
    """The process's index on its machine (torchrun's LOCAL_RANK) for picking a GPU; None: rank % GPUs."""
    pause: tuple[int, int, float] | None = None
    """Test hook (iteration, stage, seconds): that stage sleeps inside that iteration's first attempt, so a
    test can kill a process mid-iteration; a marker file ``paused-<iteration>`` says the pause began."""

    @property
    def n_stages(self) -> int:
        return self.model.n_stages

    @property
    def world_size(self) -> int:
        return self.n_stages * self.replicas

    @property
    def rank(self) -> int:
        return rank_of(self.stage, self.replica, self.n_stages)


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
    return stage


class StageWorker:
    """One replica of one stage: its module, its optimizer, and the commands it serves."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.n = spec.n_stages
        if spec.device == "cuda":
            local = spec.local_rank if spec.local_rank is not None else spec.rank
            self.device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        stage = Stage(spec.model, spec.stage) if spec.fresh else seeded_stage(spec.model, spec.seed, spec.stage)
        autocast = torch.bfloat16 if spec.precision == "bf16" else None
        self.local = LocalPipeline([stage.to(self.device)], spec.lr, spec.clip, autocast_dtype=autocast)
        self.schedule = build_schedule(spec.schedule, self.n)
        self.store: dist.TCPStore | None = None
        self.stage_group = None
        self.generation = -1
        self.replica_edge: dict[str, torch.Tensor] = {}
        """CheckFree+: the (de)embedding replica this stage holds (stage 1: embedding, S-2: head)."""
        self.shadow: dict[str, torch.Tensor] = {}
        """Redundant baseline: weights + Adam state + lr of the successor stage (k + 1) mod S."""

    @property
    def stage(self) -> Stage:
        return self.local.stages[0]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.local.optimizers[0]

    def rank(self, stage: int) -> int:
        return rank_of(stage, self.spec.replica, self.n)

    # --- group membership ------------------------------------------------------------------------

    def cmd_rendezvous(self, generation: int) -> dict:
        """Leave the old group (if any) and join generation ``generation`` of the rendezvous."""
        spec = self.spec
        self.leave_group()
        if self.store is None:
            self.store = connect_store(spec.store_addr, spec.store_port, spec.timeout_s, f"stage {spec.stage}")
        join_generation(self.store, generation, spec.backend, spec.rank, spec.world_size, spec.timeout_s)
        if spec.replicas > 1:
            # Every rank creates every stage's group, in the same order (new_group is collective).
            for k in range(self.n):
                group = dist.new_group([rank_of(k, r, self.n) for r in range(spec.replicas)])
                if k == spec.stage:
                    self.stage_group = group
        self.generation = generation
        return {"generation": generation}

    # --- one iteration ---------------------------------------------------------------------------

    def cmd_step(self, iteration: int, inputs: dict[int, np.ndarray], targets: dict[int, np.ndarray]) -> dict:
        self._maybe_pause(iteration)
        self.stage.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss_sum, tokens = self._run_program(inputs, targets)
            self._allreduce_gradients()
        except Exception as exc:  # a lost peer (connection closed) or a timeout: discard the iteration
            self.optimizer.zero_grad(set_to_none=True)
            self.leave_group()
            return {"aborted": True, "error": f"{type(exc).__name__}: {_first_line(exc)}"}
        pre, post = self.local.clip_stage_gradients()
        return {"ready": True, "loss_sum": loss_sum, "tokens": tokens, "grad_norm": pre[0],
                "grad_norm_post": post[0]}

    def cmd_commit(self) -> dict:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": self.local.stage_lrs()[0], "finite": not self.local.nonfinite_stages()}

    def cmd_abort(self) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        return {}

    def _maybe_pause(self, iteration: int) -> None:
        pause = self.spec.pause
        if pause is None or pause[0] != iteration or pause[1] != self.spec.stage:
            return
        marker = Path(self.spec.run_dir) / f"paused-{iteration}"
        if not marker.exists():  # only the first attempt: a redone iteration runs straight through
            marker.write_text(str(os.getpid()))
            time.sleep(pause[2])

    def _run_program(self, inputs: dict[int, np.ndarray], targets: dict[int, np.ndarray]) -> tuple[float, int]:
        spec = self.spec
        mbs = replica_micro_batches(spec.micro_batches, spec.replicas, spec.replica)
        program = stage_program(spec.stage, self.schedule, mbs, spec.pipeline)
        shape = (spec.micro_batch_size, spec.model.seq_len, spec.model.d_model)
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        pending = Pending()
        loss_sum, tokens = 0.0, 0
        for p in program:
            m, v = p.micro_batch, p.visit
            if not p.backward:
                if v.prev is None:
                    x, leaf = torch.as_tensor(inputs[m]).to(self.device), None
                else:
                    x = torch.empty(shape, device=self.device)
                    dist.recv(x, src=self.rank(v.prev), tag=message_tag(m, v.position - 1, False, self.n))
                    leaf = x.requires_grad_(True)
                out = self._forward(v.ops, x)
                if v.next is None:
                    target = torch.as_tensor(targets[m]).to(self.device)
                    out = causal_lm_loss(out, target)
                    loss_sum += out.item()
                    tokens += target.numel()
                else:
                    pending.add(out.detach(), self.rank(v.next), message_tag(m, v.position, False, self.n))
                saved[(m, v.position)] = (leaf, out)
            else:
                leaf, out = saved.pop((m, v.position))
                if v.next is None:
                    (out / spec.micro_batches).backward()
                else:
                    grad = torch.empty_like(out)
                    dist.recv(grad, src=self.rank(v.next), tag=message_tag(m, v.position + 1, True, self.n))
                    out.backward(grad)
                if leaf is not None:
                    pending.add(leaf.grad, self.rank(v.prev), message_tag(m, v.position, True, self.n))
        pending.wait()
        return loss_sum, tokens

    def _forward(self, ops: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """The visit's ops, with the local engine's precision rules (head and loss outside autocast)."""
        stage, h = self.stage, x
        with self.local._autocast():
            for op in ops:
                if op == "embed":
                    h = stage.embed(h)
                elif op == "body":
                    h = stage.body(h)
        if "head" in ops:
            h = stage.head(h.float() if self.local.autocast_dtype else h)
        return h

    def _allreduce_gradients(self) -> None:
        """Sum the replicas' gradients (each already scaled by 1/M, so the sum is the local engine's)."""
        if self.stage_group is None:
            return
        params = list(self.stage.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.stage_group)
        for p, piece in zip(params, torch.split(flat, [g.numel() for g in grads])):
            p.grad = piece.view_as(p).clone()

    # --- validation ------------------------------------------------------------------------------

    @torch.no_grad()
    def cmd_eval(self, inputs: np.ndarray | None, targets: np.ndarray | None, n: int, batch_size: int) -> dict:
        """In-order forward of the held-out sequences (replica 0 of every stage takes part)."""
        self.stage.eval()
        [visit] = [v for v in route(tuple(range(self.n)), self.n) if v.stage == self.spec.stage]
        total, count = 0.0, 0
        pending = Pending()
        for b, start in enumerate(range(0, n, batch_size)):
            size = min(batch_size, n - start)
            if visit.prev is None:
                x = torch.as_tensor(inputs[start:start + size]).to(self.device)
            else:
                x = torch.empty((size, self.spec.model.seq_len, self.spec.model.d_model), device=self.device)
                dist.recv(x, src=self.rank(visit.prev), tag=message_tag(b, visit.position - 1, False, self.n))
            out = self._forward(visit.ops, x)
            if visit.next is None:
                target = torch.as_tensor(targets[start:start + size]).to(self.device)
                total += causal_lm_loss(out, target).item() * size
                count += size
            else:
                pending.add(out, self.rank(visit.next), message_tag(b, visit.position, False, self.n))
        pending.wait()
        return {"loss_sum": total, "count": count}

    @torch.no_grad()
    def cmd_probe(self, order: tuple[int, ...], inputs: np.ndarray | None, size: int) -> dict:
        """Forward one micro-batch of ``size`` sequences along ``order``; report, per op, whether its output is
        finite (a diagnosis of a non-finite loss: whose output went bad first)."""
        outputs, index, pending = [], 0, Pending()
        for v in route(order, self.n):
            if v.stage != self.spec.stage:
                index += len(v.ops)
                continue
            if v.prev is None:
                h = torch.as_tensor(inputs).to(self.device)
            else:
                h = torch.empty((size, self.spec.model.seq_len, self.spec.model.d_model), device=self.device)
                dist.recv(h, src=self.rank(v.prev), tag=message_tag(0, v.position - 1, False, self.n))
            for op in v.ops:
                h = self._forward((op,), h)
                blame = 0 if op == "embed" else self.n - 1 if op == "head" else v.stage
                outputs.append((index, blame, bool(torch.isfinite(h).all())))
                index += 1
            if v.next is not None:
                pending.add(h, self.rank(v.next), message_tag(0, v.position, False, self.n))
        pending.wait()
        return {"outputs": outputs}

    # --- recovery --------------------------------------------------------------------------------

    def cmd_recover(self, rebuild: dict[int, dict], refresh: dict) -> dict:
        """Rebuild the stages in ``rebuild`` from survivors' tensors; survivors only send, replacements only
        receive (in a fixed order), so the transfer cannot deadlock. Then refresh replicas / shadows that
        lived on the replaced stages."""
        start = time.perf_counter()
        me = self.spec.stage
        pending = Pending()
        for k in sorted(rebuild):
            plan = rebuild[k]
            for src, _ in plan["body"]:
                if src == me:
                    pending.extend(isend_state(self.stage.body_state(), self.rank(k), TAG_BODY, self.device))
            if plan["edge"] == me:
                pending.extend(isend_state(self.replica_edge, self.rank(k), TAG_EDGE, self.device))
            if plan["shadow"] == me:
                pending.extend(isend_state(self.shadow, self.rank(k), TAG_SHADOW, self.device))
        received = self._rebuild(rebuild[me]) if me in rebuild else 0
        pending.wait()
        received += self._refresh(**refresh)["received"]
        return {"received_bytes": received, "sent_bytes": pending.nbytes, "transfer_s": time.perf_counter() - start,
                "lr": self.local.stage_lrs()[0], "held_bytes": self.held_bytes()}

    def _rebuild(self, plan: dict) -> int:
        stage, received = self.stage, 0
        # A new node: whatever the process holds is replaced; the recovery's seed makes "fresh" reproducible.
        stage.reset_parameters(torch.Generator().manual_seed(plan["seed"]))
        states, coefficients = [], []
        for src, coefficient in plan["body"]:
            state, nbytes = recv_state(self.rank(src), TAG_BODY, self.device)
            states.append(state)
            coefficients.append(coefficient)
            received += nbytes
        if states:
            stage.load_state_dict(weighted_state(states, coefficients), strict=False)
        if plan["edge"] is not None:
            edge, nbytes = recv_state(self.rank(plan["edge"]), TAG_EDGE, self.device)
            stage.load_state_dict(edge, strict=False)
            received += nbytes
        if plan["zero_mlp"]:
            with torch.no_grad():
                for layer in stage.layers:
                    layer.mlp.down_proj.weight.zero_()
        if plan["shadow"] is not None:
            shadow, nbytes = recv_state(self.rank(plan["shadow"]), TAG_SHADOW, self.device)
            self._load_full_state(shadow, plan["lr"])
            received += nbytes
        else:
            self.local.reset_optimizer(0, plan["lr"])
        return received

    def cmd_refresh(self, replicas: list[tuple[int, int]], shadows: list[tuple[int, int]]) -> dict:
        return self._refresh(replicas, shadows)

    def _refresh(self, replicas: list[tuple[int, int]], shadows: list[tuple[int, int]]) -> dict:
        """Owners send their edge (CheckFree+) or full state (redundant) to the holders; all sends are posted
        before any receive, so a ring of shadows cannot deadlock."""
        me, pending, received = self.spec.stage, Pending(), 0
        for owner, holder in replicas:
            if owner == me:
                pending.extend(isend_state(self.stage.edge_state(), self.rank(holder), TAG_REFRESH, self.device))
        for owner, holder in shadows:
            if owner == me:
                pending.extend(isend_state(self._full_state(), self.rank(holder), TAG_REFRESH + 1, self.device))
        for owner, holder in replicas:
            if holder == me:
                self.replica_edge, nbytes = recv_state(self.rank(owner), TAG_REFRESH, self.device)
                received += nbytes
        for owner, holder in shadows:
            if holder == me:
                self.shadow, nbytes = recv_state(self.rank(owner), TAG_REFRESH + 1, self.device)
                received += nbytes
        pending.wait()
        return {"received": received, "sent_bytes": pending.nbytes, "held_bytes": self.held_bytes()}

    def held_bytes(self) -> int:
        held = list(self.replica_edge.values()) + list(self.shadow.values())
        return sum(t.numel() * t.element_size() for t in held)

    def _full_state(self) -> dict[str, torch.Tensor]:
        """Weights and Adam state in one flat dict (what a redundant shadow holds; the lr travels with the plan)."""
        tensors, _ = optimizer_tensors(self.optimizer)
        state = {f"w.{k}": v for k, v in self.stage.state_dict().items()}
        state.update({f"opt.{k}": v for k, v in tensors.items()})
        return state

    def _load_full_state(self, state: dict[str, torch.Tensor], lr: float) -> None:
        weights = {k[2:]: v for k, v in state.items() if k.startswith("w.")}
        self.stage.load_state_dict(weights)
        self.local.reset_optimizer(0, lr)
        rest = {"param_groups": self.optimizer.state_dict()["param_groups"]}
        tensors = {k[4:]: v.cpu() if k.endswith(".step") else v for k, v in state.items() if k.startswith("opt.")}
        self.optimizer.load_state_dict(optimizer_state_from(tensors, rest))

    # --- checkpoints (the checkpointing baseline) ----------------------------------------------------

    def cmd_save(self, directory: str) -> dict:
        """Write this stage's shard (weights + Adam state) atomically; replica 0 writes for all replicas."""
        shard = {"stage": self.stage.state_dict(), "optimizer": self.optimizer.state_dict()}
        nbytes = state_bytes(shard["stage"]) + optimizer_state_bytes(shard["optimizer"])
        if self.spec.replica == 0:
            torch_save_atomic(shard, Path(directory) / f"stage{self.spec.stage}.pt")
        return {"shard_bytes": nbytes}

    def cmd_load(self, directory: str) -> dict:
        """Roll back to the shard in ``directory`` (a replacement downloads it from storage the same way)."""
        shard = torch.load(Path(directory) / f"stage{self.spec.stage}.pt", map_location=self.device,
                           weights_only=True)
        self.stage.load_state_dict(shard["stage"])
        lr = shard["optimizer"]["param_groups"][0]["lr"]
        self.local.reset_optimizer(0, lr)  # the rolled-back lr is kept, as the local engine does
        self.optimizer.load_state_dict(shard["optimizer"])
        return {"lr": lr}

    # --- inspection and lifecycle ----------------------------------------------------------------

    def cmd_get_state(self) -> dict:
        return {"state": {k: v.detach().cpu().numpy() for k, v in self.stage.state_dict().items()},
                "lr": self.local.stage_lrs()[0], "replica_edge": sorted(self.replica_edge),
                "generation": self.generation}

    def cmd_die(self, code: int = 70) -> dict:
        os._exit(code)  # a real, abrupt exit: no cleanup, no reply, connections closed by the kernel

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
        self.leave_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else ""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (no orphans, whatever kills the parent)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def main(conn: Any, spec: WorkerSpec) -> None:
    """Process entry point: build the stage, say hello, then serve commands until ``stop``."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops us in order
    if is_loopback(spec.store_addr):  # gloo would otherwise pick the interface of the machine's hostname
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    try:
        worker = StageWorker(spec)
    except Exception as exc:
        conn.send({"error": f"building stage {spec.stage} failed: {type(exc).__name__}: {exc}"})
        return
    conn.send({"hello": True, "pid": os.getpid(), "build_s": time.perf_counter() - start})
    try:
        serve(conn, worker)
    finally:
        worker.close()


def serve(conn: Any, worker: StageWorker) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the supervisor is gone
            return
        command = message.pop("cmd")
        if command == "stop":
            worker.close()  # leave the group before saying so: the supervisor may exit right after
            conn.send({})
            return
        try:
            reply = getattr(worker, f"cmd_{command}")(**message)
        except Exception as exc:
            worker.leave_group()  # whatever failed, peers must not wait on us (see leave_group)
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
