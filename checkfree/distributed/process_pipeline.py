"""The pipeline the trainer drives, with its stages in other processes.

``ProcessPipeline`` answers the same calls as ``checkfree.pipeline.LocalPipeline`` (``train_step``,
``evaluate``, ``stage_lrs``, ``nonfinite_stages``), so the trainer's loop runs unchanged over it. One
iteration is two-phase: every worker runs its program and replies *ready* (loss, gradient norms), and
only then does ``commit`` step every optimizer. A stage lost before the commit discards the iteration
everywhere; ``on_lost`` (the supervisor) replaces and recovers the stage and the iteration is redone with
the same micro-batches. A stage lost *during* the commit has missed only its own step: the survivors'
step stands and the stage is recovered right away, from their stepped weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from checkfree.distributed.cluster import StageLost, WorkerError, WorkerPool, raise_errors
from checkfree.distributed.routes import replica_micro_batches
from checkfree.distributed.worker import rank_of
from checkfree.pipeline import StepResult
from checkfree.schedule import Schedule

MAX_ATTEMPTS = 5
"""An iteration (or validation) interrupted more often than this in a row stops the run."""


class ProcessPipeline:
    def __init__(self, pool: WorkerPool, micro_batches: int, lr: float) -> None:
        self.pool = pool
        self.n_stages, self.replicas = pool.n_stages, pool.replicas
        self.micro_batches = micro_batches
        self.lrs = [lr] * self.n_stages
        self.finite = [True] * self.n_stages
        self.iteration = 0
        self.on_lost: Callable[[StageLost, list[torch.Tensor] | None], list[torch.Tensor] | None] | None = None
        """The supervisor's recovery: replaces the lost stages, returns the micro-batches to redo with."""

    def _retry(self, attempt: Callable[[list[torch.Tensor] | None], object], batches: list[torch.Tensor] | None):
        for _ in range(MAX_ATTEMPTS):
            try:
                return attempt(batches)
            except StageLost as lost:
                if self.on_lost is None:
                    raise
                batches = self.on_lost(lost, batches)
        raise RuntimeError(f"iteration {self.iteration} was interrupted by stage failures {MAX_ATTEMPTS} times "
                           "in a row; giving up.")

    # --- training ----------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[torch.Tensor], schedule: Schedule,
                   skip_nonfinite: bool = False) -> StepResult:
        """As ``LocalPipeline.train_step``: with ``skip_nonfinite`` no stage steps when the loss or a gradient
        norm is non-finite (the commit becomes an abort everywhere)."""
        return self._retry(lambda batches: self._attempt_step(batches, skip_nonfinite), micro_batches)

    def _attempt_step(self, batches: list[torch.Tensor], skip_nonfinite: bool) -> StepResult:
        last = self.n_stages - 1
        messages = {}
        for rank, handle in self.pool.handles.items():
            mbs = replica_micro_batches(self.micro_batches, self.replicas, handle.replica)
            messages[rank] = {
                "cmd": "step", "iteration": self.iteration,
                "inputs": {m: batches[m][:, :-1].numpy() for m in mbs} if handle.stage == 0 else {},
                "targets": {m: batches[m][:, 1:].numpy() for m in mbs} if handle.stage == last else {},
            }
        try:
            ready = self.pool.request(messages, "step")
        except StageLost as lost:
            self._abort(lost.replies)
            raise
        if any("ready" not in reply for reply in ready.values()):
            # Aborted with every process alive (a timeout): not a failure we can recover from by replacement.
            self._abort(ready)
            raise_errors(ready, self.pool.handles, "step")
            reasons = sorted({r["error"] for r in ready.values() if r.get("aborted")})
            raise WorkerError(f"iteration {self.iteration} was aborted with every stage alive: {reasons}; "
                              "raise engine.timeout_s if the stages are just slow.")
        first = {k: ready[rank_of(k, 0, self.n_stages)] for k in range(self.n_stages)}
        losses = [ready[rank_of(last, r, self.n_stages)] for r in range(self.replicas)]
        result = StepResult(
            loss=sum(r["loss_sum"] for r in losses) / self.micro_batches,
            grad_norm=[first[k]["grad_norm"] for k in range(self.n_stages)],
            grad_norm_post=[first[k]["grad_norm_post"] for k in range(self.n_stages)],
            tokens=sum(r["tokens"] for r in losses),
        )
        if skip_nonfinite and not (math.isfinite(result.loss) and all(map(math.isfinite, result.grad_norm))):
            self._abort(ready)
            result.stepped = False
            return result
        try:
            committed = self.pool.request({rank: {"cmd": "commit"} for rank in ready}, "commit")
        except StageLost as lost:
            committed = lost.replies
            if self.on_lost is None:
                raise
            self.on_lost(lost, None)  # the survivors stepped: keep the step, rebuild the lost stage now
        raise_errors(committed, self.pool.handles, "commit")
        self.finite = [True] * self.n_stages
        for rank, reply in committed.items():
            stage = self.pool.handles[rank].stage
            self.lrs[stage] = reply["lr"]
            self.finite[stage] = self.finite[stage] and reply["finite"]
        return result

    def _abort(self, replies: dict[int, dict]) -> None:
        """Survivors that computed their gradients drop them (none of them stepped)."""
        holding = [rank for rank, reply in replies.items() if reply.get("ready") and rank in self.pool.handles
                   and self.pool.handles[rank].process.exitcode is None]
        if holding:
            try:
                self.pool.request({rank: {"cmd": "abort"} for rank in holding}, "abort")
            except StageLost:
                pass  # recovery follows anyway; whoever died here is replaced with the others

    # --- validation --------------------------------------------------------------------------------

    def evaluate(self, sequences: torch.Tensor, batch_size: int) -> float:
        return self._retry(lambda _: self._attempt_eval(sequences, batch_size), None)

    def _attempt_eval(self, sequences: torch.Tensor, batch_size: int) -> float:
        last = self.n_stages - 1
        messages = {
            rank_of(k, 0, self.n_stages): {
                "cmd": "eval", "n": sequences.shape[0], "batch_size": batch_size,
                "inputs": sequences[:, :-1].numpy() if k == 0 else None,
                "targets": sequences[:, 1:].numpy() if k == last else None,
            }
            for k in range(self.n_stages)
        }
        replies = self.pool.request(messages, "eval")
        raise_errors(replies, self.pool.handles, "eval")
        reply = replies[rank_of(last, 0, self.n_stages)]
        return reply["loss_sum"] / reply["count"]

    def first_nonfinite_output(self, input_ids: torch.Tensor, order: tuple[int, ...]) -> int | None:
        """As ``LocalPipeline.first_nonfinite_output``: the stage whose output first turns non-finite along
        ``order`` (embedding counted as stage 0, head as S-1), from a forward probe on the workers."""
        messages = {rank_of(k, 0, self.n_stages): {"cmd": "probe", "order": tuple(order),
                                                   "inputs": input_ids.numpy() if k == 0 else None,
                                                   "size": input_ids.shape[0]}
                    for k in range(self.n_stages)}
        replies = self.pool.request(messages, "probe")
        raise_errors(replies, self.pool.handles, "probe")
        outputs = sorted(entry for reply in replies.values() for entry in reply["outputs"])
        return next((blame for _, blame, finite in outputs if not finite), None)

    # --- what the trainer and the strategies read ----------------------------------------------------

    def stage_lrs(self) -> list[float]:
        return list(self.lrs)

    def nonfinite_stages(self) -> list[int]:
        return [k for k, ok in enumerate(self.finite) if not ok]
