"""The supervisor: the trainer's loop, driving one process per stage (x replica) instead of local modules.

``DistributedTrainer`` is the local ``Trainer`` with three parts swapped: the pipeline (``ProcessPipeline``,
stages in worker processes), the strategy (``RemoteRecovery``, the same rules executed with transfers
between processes) and failures, which are real. Everything else (failure drawing, the simulated clock,
validation, ``metrics.jsonl``, ``summary.json``) is the local trainer's own code, so both engines write
the same files in the same format.

A failure drawn by the failure model makes the stage's processes exit (``os._exit``) at the iteration
boundary; the supervisor sees them gone, starts replacements (new PIDs), re-forms the process group and
has the strategy move what the replacement needs. A process that dies on its own, or is killed from
outside, mid-iteration, aborts that iteration everywhere; the same recovery runs and the iteration is
redone with the same micro-batches. Each recovery report's ``details`` hold its wall-clock anatomy:
``detect_s``, ``respawn_s``, ``rendezvous_s``, ``transfer_s`` and the old and new PIDs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from checkfree.config import ConfigError
from checkfree.data import load_corpus
from checkfree.distributed.cluster import StageLost, WorkerPool
from checkfree.distributed.launchers import make_pool
from checkfree.distributed.process_pipeline import ProcessPipeline
from checkfree.distributed.rendezvous import pick_backend
from checkfree.distributed.strategies import RemoteRecovery
from checkfree.distributed.worker import WorkerSpec
from checkfree.failures import build_failure_model, failing_stages
from checkfree.recovery.base import RecoveryContext, RecoveryReport
from checkfree.runconfig import RunConfig
from checkfree.schedule import build_schedule
from checkfree.trainer import Trainer, pick_device


def check_supported(cfg: RunConfig) -> None:
    """Reject, before any work, what the distributed engine does not do (yet)."""
    if cfg.trainer.resume is not None or cfg.trainer.save_every:
        raise ConfigError(f"trainer.resume={cfg.trainer.resume!r} / trainer.save_every={cfg.trainer.save_every} "
                          "are not supported with engine=distributed yet: the stages' state lives in the worker "
                          "processes. Use engine=local to resume, or strategy=checkpoint for rollbacks within a run.")


class DistributedTrainer(Trainer):
    """The local trainer's loop over stage processes, with real failures and real recovery."""

    def __init__(self, cfg: RunConfig, run_dir: Path, pause: tuple[int, int, float] | None = None) -> None:
        super().__init__(cfg, run_dir)
        self.pool: WorkerPool | None = None
        self.pause = pause
        self.last_record: dict | None = None
        # Recoveries forced by processes that died mid-command; merged into the iteration's record.
        self.crash_stages: list[int] = []
        self.crash_reports: list[RecoveryReport] = []
        self.crash_sim_s = 0.0

    # --- set-up ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        check_supported(cfg)
        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.trainer.device)
        self.corpus = load_corpus(cfg.data, cfg.model.seq_len, batch_seed=cfg.seed)
        self.model_cfg = cfg.model.with_vocab(self.corpus.vocab_size)
        n = self.model_cfg.n_stages
        self.strategy = RemoteRecovery(cfg.strategy, n)
        self.schedule = build_schedule(self.strategy.schedule_name, n)
        self.failures = build_failure_model(cfg.failure, n, cfg.seed)
        self.may_fail = set(failing_stages(cfg.failure, n))
        self.cost = self._build_cost_model()
        self.iteration_s = self._iteration_seconds()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.pool = self.make_pool()
        self.pool.start()
        self.pipeline = ProcessPipeline(self.pool, cfg.trainer.micro_batches, cfg.trainer.lr)
        self.pipeline.on_lost = self.on_stage_lost
        self.ctx = RecoveryContext(self.pipeline, cfg.trainer.lr, run_dir=self.run_dir, data=self.corpus.train,
                                   seed=cfg.seed)
        self.strategy.setup(self.ctx)
        self.failure_horizon = 0.0
        self.pending_failures: set[int] = set()

    def make_pool(self) -> WorkerPool:
        """The stage processes: started here, one per stage x replica (``launch`` overrides: torchrun's)."""
        return make_pool(self.worker_spec(), self.cfg.engine, self.run_dir)

    def worker_spec(self) -> WorkerSpec:
        cfg, engine = self.cfg, self.cfg.engine
        world = self.model_cfg.n_stages * engine.replicas
        return WorkerSpec(
            stage=0, replica=0, model=self.model_cfg, seed=cfg.seed, lr=cfg.trainer.lr, clip=cfg.trainer.clip,
            precision=cfg.trainer.precision, device=self.device.type, schedule=self.schedule.name,
            pipeline=cfg.network.pipeline, micro_batches=cfg.trainer.micro_batches,
            micro_batch_size=cfg.trainer.micro_batch_size, replicas=engine.replicas,
            backend=pick_backend(engine, self.device), store_addr=engine.master_addr,
            store_port=engine.master_port, timeout_s=engine.timeout_s, run_dir=str(self.run_dir),
            threads=max(1, (os.cpu_count() or 1) // world), pause=self.pause,
        )

    def run(self) -> dict:
        try:
            return super().run()
        finally:
            if self.pool is not None:
                self.pool.shutdown()  # success, error or Ctrl-C: every worker is stopped and joined

    # --- the loop's hooks --------------------------------------------------------------------------

    def iteration(self, iteration: int) -> dict:
        self.pipeline.iteration = iteration
        record = super().iteration(iteration)
        self.last_record = record
        return self.merge_crashes(record)

    def evaluate(self) -> float:
        loss = super().evaluate()
        if self.last_record is not None:  # a crash during validation belongs to the iteration just logged
            self.merge_crashes(self.last_record)
        return loss

    def recover(self, failed: list[int]) -> list[RecoveryReport]:
        """The stages' processes really exit first (those still alive), then the strategy recovers."""
        detect_s = self.pool.kill(failed)
        if detect_s is not None:
            self.strategy.detect_s = detect_s
        reports = super().recover(failed)
        self.after_recovery(reports)
        return reports

    def after_recovery(self, reports: list[RecoveryReport]) -> None:
        """Called with every recovery's reports once the replacements hold their new state (a test hook)."""

    # --- processes that died mid-command -----------------------------------------------------------

    def on_stage_lost(self, lost: StageLost, batches: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """Recover the lost stages now; an interrupted step (or validation) is then redone. (Lost during the
        commit, the survivors' step stands and the stage is rebuilt from their stepped weights.)"""
        iteration = self.pipeline.iteration
        for k in sorted(lost.stages):
            self.totals.failures.append({"iteration": iteration, "stage": k, "time_s": self.totals.sim_time_s,
                                         "cause": f"process exited during {lost.command}"})
        self.strategy.detect_s = lost.detect_s
        progress = self.ctx.progress
        reports = self.recover(sorted(lost.stages))
        self.crash_stages += sorted(lost.stages)
        self.crash_reports += reports
        # The discarded attempt costs its iteration on the simulated clock, then the recovery.
        self.crash_sim_s += max((r.sim_seconds for r in reports), default=0.0)
        if lost.command == "step":
            self.crash_sim_s += self.iteration_s
        if batches is not None and self.ctx.progress != progress:
            # A rollback rewound the data stream: the redone iteration reads from the checkpoint's position.
            batches = [self.corpus.train.next_batch(self.cfg.trainer.micro_batch_size)
                       for _ in range(self.cfg.trainer.micro_batches)]
        return batches

    def merge_crashes(self, record: dict) -> dict:
        if not self.crash_reports and not self.crash_stages:
            return record
        record["failed_stages"] = sorted(set(record.get("failed_stages", [])) | set(self.crash_stages))
        record["recoveries"] = record.get("recoveries", []) + [r.to_dict() for r in self.crash_reports]
        record["recovery_sim_s"] = record.get("recovery_sim_s", 0.0) + self.crash_sim_s
        self.totals.sim_time_s += self.crash_sim_s
        self.totals.recovery_sim_s += self.crash_sim_s
        record["sim_time_s"] = self.totals.sim_time_s
        record["lr"] = self.pipeline.stage_lrs()
        self.crash_stages, self.crash_reports, self.crash_sim_s = [], [], 0.0
        return record


def train(cfg: RunConfig, run_dir: Path | str) -> dict:
    """Run one training job with one process per stage (x replica) into ``run_dir``; returns the summary."""
    return DistributedTrainer(cfg, Path(run_dir)).run()
