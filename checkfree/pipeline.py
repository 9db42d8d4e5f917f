"""The local engine: every stage in one process, one optimizer per stage, and the local plan executor.

One iteration runs ``M`` micro-batches, each along its route (``checkfree.stage.routes``: embedding first, stage
bodies in the schedule's order, head last), accumulates ``loss / M`` gradients, records each stage's
gradient norm before and after clipping, clips each stage on its own and steps every stage's optimizer.
With ``fuse`` the micro-batches that take the same route run as one batch (same math up to float rounding,
one forward and backward instead of several: the fast path of long CPU experiments).

Recovery: the local engine is a ``checkfree.stage.host.StageHost`` that hosts every stage (its courier places them
all in this process, so whatever a plan moves is handed over in memory): ``execute`` is the host's part of a
``RecoveryPlan`` — the same executor a stage process runs — or a rollback from storage; ``upkeep`` refreshes
held copies and writes checkpoints. The rules themselves — how a visit computes, how a stage is rebuilt — are
``checkfree.stage.compute.StageCompute``'s, shared with the stage processes.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from checkfree.engine import Outcome
from checkfree.model.llama import Stage
from checkfree.plan import Held, RecoveryPlan, Traffic, Upkeep, rebuild_reports, rollback_reports, sent_into
from checkfree.simulation.placement import Placement
from checkfree.stage.compute import StageCompute, StepResult, causal_lm_loss, per_sequence_loss
from checkfree.stage.host import StageHost
from checkfree.stage.routes import blame, route
from checkfree.stage.schedule import Schedule
from checkfree.storage.checkpoints import BackgroundWriter, CheckpointStore
from checkfree.transport.courier import Courier


class LocalEngine(StageHost):
    """Stages + per-stage Adam, trained over micro-batches in one process: the stage host of every stage."""

    def __init__(self, stages: list[Stage], lr: float, clip: float = 1.0, autocast_dtype: torch.dtype | None = None,
                 fuse: bool = False, compile: bool = False, buffer: int = 0) -> None:
        computes = [StageCompute(stage, lr, clip, autocast_dtype=autocast_dtype, compile=compile) for stage in stages]
        courier = Courier(len(stages), torch.device("cpu"), computes[0].device)
        courier.place((0,) * len(stages), 0)  # every stage here: what one sends another is handed over in memory
        super().__init__(len(stages), courier, buffer)
        self.steps = 0
        """Optimizer steps taken (numbering the micro-batches the activation ring keeps, as the process engine's)."""
        self.computes.update(enumerate(computes))
        self.lr = lr
        self.fuse = fuse
        self.store: CheckpointStore | None = None
        self.writer = BackgroundWriter()
        """Persists asynchronous checkpoints while training goes on (``Upkeep.in_background``)."""
        self.lost: set[int] = set()

    @property
    def n_stages(self) -> int:
        return self.n

    @property
    def stages(self) -> list[Stage]:
        return [c.stage for c in self.computes.values()]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [c.optimizer for c in self.computes.values()]

    @property
    def device(self) -> torch.device:
        return self.computes[0].device

    def start(self, run_dir: Path | str, fresh: bool = True) -> None:
        self.store = CheckpointStore(Path(run_dir) / "checkpoints")
        if fresh:
            self.store.clear()

    def close(self) -> None:
        self.writer.close()

    # --- training ------------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[torch.Tensor], schedule: Schedule,
                   skip_nonfinite: bool = False) -> StepResult:
        """One optimizer step over ``micro_batches`` (each ``[B, seq_len + 1]`` token ids).

        With ``skip_nonfinite`` no stage steps when the loss or any stage's gradient norm is non-finite
        (``StepResult.stepped`` is False): one bad stage's NaN would otherwise reach every other stage's
        weights through the backward pass and Adam's moments.
        """
        for compute in self.computes.values():
            compute.train()
        if self.ring is not None:
            self.ring.discard()  # what a step that raised or was skipped noted: only a step taken keeps its notes
        losses, tokens, n = [], 0, len(micro_batches)
        for order, indices, group in self._groups(micro_batches, schedule):
            batch = (group[0] if len(group) == 1 else torch.cat(group)).to(self.device, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            seqs = [self.steps * n + m for m in indices] if self.ring is not None else None
            loss = causal_lm_loss(self.logits(inputs, order, seqs), targets)
            StageCompute.backward_loss(loss, n, fused=len(group))
            losses.append((loss.detach(), len(group)))
            tokens += targets.numel()
        # The losses are read once, after the last backward: a read per micro-batch would make a GPU wait, idle,
        # for the host to queue the next one. Summed in the same order as Python floats, as the workers do.
        values = torch.stack([loss for loss, _ in losses]).tolist()
        total = 0.0
        for value, (_, size) in zip(values, losses):
            total += value * size
        norms = [compute.clip() for compute in self.computes.values()]
        result = StepResult(total / n, [pre for pre, _ in norms], [post for _, post in norms], tokens)
        if skip_nonfinite and not result.finite:
            result.stepped = False
            return result
        for compute in self.computes.values():
            compute.step()
        self.steps += 1
        if self.ring is not None:
            self.ring.commit(self.steps * n - 1)
        return result

    def _groups(self, micro_batches: list[torch.Tensor],
                schedule: Schedule) -> list[tuple[tuple[int, ...], list[int], list[torch.Tensor]]]:
        """(order, micro-batch indices, micro-batches): one each, or with ``fuse`` one group per distinct route,
        in first-seen order."""
        if not self.fuse:
            return [(schedule.order(m), [m], [batch]) for m, batch in enumerate(micro_batches)]
        groups: dict[tuple[int, ...], tuple[list[int], list[torch.Tensor]]] = {}
        for m, batch in enumerate(micro_batches):
            indices, batches = groups.setdefault(schedule.order(m), ([], []))
            indices.append(m)
            batches.append(batch)
        return [(order, indices, batches) for order, (indices, batches) in groups.items()]

    def logits(self, input_ids: torch.Tensor, order: tuple[int, ...], seqs: list[int] | None = None) -> torch.Tensor:
        """Logits for ``input_ids``: the route's visits chained in this process (what training, validation and
        the tests that compare the split model with the unsplit one all run). ``seqs``: the micro-batches'
        numbers (a fused group's, in its rows' order), whose activations the ring buffers as the stage processes
        would: what each visit received and sent."""
        h, visits = input_ids, route(order, self.n_stages)
        for i, visit in enumerate(visits):
            if seqs is not None and i > 0:
                for seq, x in zip(seqs, h.chunk(len(seqs))):
                    self.note_received(visit, visits[i - 1], seq, x)
            h = self.computes[visit.stage].forward(visit.ops, h)
            if seqs is not None and i + 1 < len(visits):
                for seq, out in zip(seqs, h.chunk(len(seqs))):
                    self.note_sent(visit, visits[i + 1], seq, out)
        return h

    @torch.no_grad()
    def evaluate(self, sequences: torch.Tensor, batch_size: int) -> float:
        """Mean token cross-entropy over ``sequences`` (``[N, seq_len + 1]``), in order, no grad."""
        for compute in self.computes.values():
            compute.stage.eval()
        order = tuple(range(self.n_stages))
        total, count = 0.0, 0
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start: start + batch_size].to(self.device)
            total += causal_lm_loss(self.logits(batch[:, :-1], order), batch[:, 1:]).item() * batch.shape[0]
            count += batch.shape[0]
        return total / count

    @torch.no_grad()
    def sequence_losses(self, sequences: torch.Tensor, batch_size: int) -> list[float]:
        """Each validation sequence's mean token cross-entropy (for the standard error of the validation loss)."""
        for compute in self.computes.values():
            compute.stage.eval()
        order, out = tuple(range(self.n_stages)), []
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start: start + batch_size].to(self.device)
            out += per_sequence_loss(self.logits(batch[:, :-1], order), batch[:, 1:]).tolist()
        return out

    # --- what the trainer reads ----------------------------------------------------------------------

    def stage_lrs(self) -> list[float]:
        return [compute.lr for compute in self.computes.values()]

    def nonfinite_stages(self) -> list[int]:
        """Stages whose weights contain a non-finite value (empty when all are finite)."""
        return [k for k, compute in self.computes.items() if not compute.finite()]

    @torch.no_grad()
    def first_nonfinite_output(self, input_ids: torch.Tensor, order: tuple[int, ...]) -> int | None:
        """The first stage, along ``order``'s route, whose output is non-finite (the embedding counts as
        stage 0, the head as stage S-1); None when every output is finite. A diagnosis, not a hot path."""
        h = input_ids.to(self.device)
        for visit in route(order, self.n_stages):
            h, outputs = self.computes[visit.stage].probe(visit.ops, h)
            for op, finite in outputs:
                if not finite:
                    return blame(op, visit.stage, self.n_stages)
        return None

    def held_bytes(self) -> int:
        """Extra bytes the held copies (shadows, replicas, snapshots) keep resident on the nodes."""
        return sum(self.held_bytes_per_node())

    def core_seconds(self) -> None:
        return None  # one process: its time is the wall clock's

    def held_bytes_per_node(self) -> list[int]:
        """The same, node by node (the holder of each copy, and each stage's own staging buffer)."""
        per_node = self.held_bytes_of()
        return [per_node[k] for k in range(self.n_stages)]

    def stage_states(self) -> list[dict[str, torch.Tensor]]:
        return [compute.stage.state_dict() for compute in self.computes.values()]

    # --- recovery: the local executor ----------------------------------------------------------------

    def lose(self, stages: list[int]) -> None:
        """The stages' nodes are gone, and the copies they held with them (a plan can never read those)."""
        self.writer.wait()
        self.lost |= set(stages)
        for stage in stages:
            self.forget(stage)

    def lose_nodes(self, nodes: list[tuple[int, int]]) -> None:
        """One pipeline computes every replica's share here (the same arithmetic): a lost replica changes only
        the clock."""

    def place(self, placement: Placement) -> None:
        """Every stage computes in this process wherever it is placed: a placement changes only the clock."""

    def execute(self, plan: RecoveryPlan, progress: int) -> Outcome:
        self.writer.wait()  # a flush in flight is finished first: the simulated clock decides whether it counts
        if plan.reads_storage:
            start = time.perf_counter()
            restored = self.store.restore(self._load_checkpoint, plan.unpersisted)
            reports = rollback_reports(plan, progress, restored)
            for report in reports:
                report.wall_s = time.perf_counter() - start
            self.lost = set()
            return Outcome(reports, restored)
        missing = self.lost - {r.stage for r in plan.rebuilds}
        if missing:
            raise RuntimeError(f"the {plan.strategy} plan leaves lost stage(s) {sorted(missing)} unrebuilt")
        start = time.perf_counter()
        received, fitted = self.recover(plan)
        self.lost = set()
        reports = rebuild_reports(plan, received, fitted)
        wall = time.perf_counter() - start
        for report in reports:
            report.wall_s = wall
        return Outcome(reports)

    def upkeep(self, upkeep: Upkeep, meta: dict[str, Any]) -> Traffic:
        traffic = Traffic()
        for held, n_bytes in self.refresh(list(upkeep.refresh)).items():
            sent_into(traffic, held, n_bytes)
        if upkeep.checkpoint:
            traffic.shard_bytes = self._save_checkpoint(meta, upkeep.keep, upkeep.in_background)
            traffic.shards_in_background = upkeep.in_background
        return traffic

    def _save_checkpoint(self, meta: dict[str, Any], keep: int, in_background: bool = False) -> list[int]:
        """Every stage's shard to storage; ``in_background``: copied to host memory now (what the step waits
        for), persisted by the background writer while training goes on. Returns each shard's bytes."""
        if not in_background:
            return self._persist([compute.state() for compute in self.computes.values()], meta, keep)
        states, meta = [self.stage_for_background(k) for k in range(self.n_stages)], copy.deepcopy(meta)
        self.writer.submit(lambda: self._persist(states, meta, keep))
        return [self.staged[k] for k in range(self.n_stages)]

    def _persist(self, states: list[dict[str, Any]], meta: dict[str, Any], keep: int) -> list[int]:
        with self.store.writing(meta["progress"]) as tmp:
            written = [self.store.write_shard(tmp, k, state) for k, state in enumerate(states)]
            shards = [n for n, _ in written]
            digests = {f"stage{k}.pt": digest for k, (_, digest) in enumerate(written)}
            self.store.commit(tmp, {**meta, "shard_bytes": shards, "digests": digests}, keep)
        return shards

    def _load_checkpoint(self, checkpoint: Path, meta: dict[str, Any]) -> None:
        # Every shard is read (and verified) before any is applied: a damaged one leaves the stages as they
        # were, and the store falls back to the older checkpoint.
        shards = [self.store.read_shard(checkpoint, k, meta) for k in range(self.n_stages)]
        for compute, shard in zip(self.computes.values(), shards):
            compute.load_state(shard)

    # --- resume --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.writer.wait()
        return {"stages": self.stage_states(), "optimizers": [c.optimizer.state_dict() for c in self.computes.values()],
                "held": [((h.kind, h.owner, h.holder), copy) for h, copy in self.held.items()],
                "staged": dict(self.staged), "checkpoints": self.store.state_dict() if self.store is not None else None,
                "steps": self.steps,
                "buffered": [item for k in range(self.n_stages) for item in self.ring.state(k)] if self.ring else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for compute, weights, optimizer in zip(self.computes.values(), state["stages"], state["optimizers"], strict=True):
            compute.load_state({"weights": weights, "optimizer": optimizer})
        self.held = {Held(*key): copy for key, copy in state["held"]}
        self.staged = dict(state.get("staged", {}))  # absent from resume files written before it was counted
        self.steps = state.get("steps", 0)
        if self.ring is not None:
            self.ring.load(state.get("buffered", []))
        if state["checkpoints"] is not None:
            self.store.load_state_dict(state["checkpoints"])


__all__ = ["LocalEngine"]
