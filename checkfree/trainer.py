"""The training loop: failure events -> recovery -> step -> after-step -> clock -> eval -> log.

One iteration, top to bottom (DESIGN §4):

1. The failure model yields the events that fall in this iteration's simulated time window; the
   strategy rebuilds *all* lost stages at once, using only survivors as sources.
2. The pipeline runs ``M`` micro-batches in the strategy's schedule, clips per stage and steps.
3. The strategy's after-step hook runs (checkpoint upload, replica sync) and reports its traffic.
4. The simulated clock advances by the cost model's iteration time + recovery + overheads.
5. Every ``eval_every`` iterations, validation on the held-out split.
6. One JSON line per iteration to ``metrics.jsonl``; ``summary.json`` is written however the run ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkfree.cost import CostModel, StepOverhead, measure_flops
from checkfree.data import Corpus, load_corpus
from checkfree.failures import FailureEvent, build_failure_model, failing_stages
from checkfree.model import build_stages, preset, stage_param_counts
from checkfree.pipeline import LocalPipeline, StepResult
from checkfree.recovery import RecoveryContext, RecoveryReport, build_strategy
from checkfree.recovery.base import UnrecoverableFailure
from checkfree.runconfig import RunConfig
from checkfree.runlog import RunLog
from checkfree.schedule import build_schedule


class NonFiniteError(RuntimeError):
    """A non-finite loss or weight, with the iteration and stage in the message."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: stop, and say so in summary.json."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device='cuda' was asked for but torch sees no CUDA device; use cpu or auto.")
    return torch.device(name)


@dataclass
class Totals:
    """Everything the summary needs, kept up to date as the run goes."""

    iterations: int = 0
    sim_time_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)
    lost_iterations: int = 0
    initial_val_loss: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    time_to_target_s: float | None = None
    iterations_to_target: int | None = None
    tokens: int = 0
    recovery_sim_s: float = 0.0
    overhead_sim_s: float = 0.0


class Trainer:
    """Builds every part once from a validated RunConfig, then runs the loop."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.totals = Totals()
        self.status, self.error = "running", None
        self.log: RunLog | None = None

    # --- set-up --------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.device = pick_device(cfg.trainer.device)
        self.corpus: Corpus = load_corpus(cfg.data, cfg.model.seq_len, batch_seed=cfg.seed)
        self.model_cfg = cfg.model.with_vocab(self.corpus.vocab_size)
        stages = build_stages(self.model_cfg, cfg.seed, self.device)
        autocast = torch.bfloat16 if cfg.trainer.precision == "bf16" else None
        self.pipeline = LocalPipeline(stages, cfg.trainer.lr, cfg.trainer.clip, autocast_dtype=autocast)
        self.strategy = build_strategy(cfg.strategy, self.model_cfg.n_stages)
        self.schedule = build_schedule(self.strategy.schedule_name, self.model_cfg.n_stages)
        self.failures = build_failure_model(cfg.failure, self.model_cfg.n_stages, cfg.seed)
        self.may_fail = set(failing_stages(cfg.failure, self.model_cfg.n_stages))
        self.cost = self._build_cost_model()
        self.iteration_s = self._iteration_seconds()
        self.ctx = RecoveryContext(self.pipeline, cfg.trainer.lr, run_dir=self.run_dir, data=self.corpus.train,
                                   seed=cfg.seed)
        self.strategy.setup(self.ctx)
        self.failure_horizon = 0.0  # simulated time up to which failure events have been drawn
        self.pending_failures: set[int] = set()  # stages marked failed by the numeric guard

    def _build_cost_model(self) -> CostModel:
        cfg = self.cfg
        priced = self.model_cfg
        micro_batch_size = cfg.trainer.micro_batch_size
        if cfg.trainer.clock_preset is not None:
            # Price every iteration as the paper-scale model would cost, so that failure rates per hour
            # mean at CPU scale what they mean in the paper's setting (DESIGN §5, README "Results").
            priced = preset(cfg.trainer.clock_preset)
            micro_batch_size = cfg.trainer.clock_micro_batch_size or micro_batch_size
        flops = measure_flops() if cfg.network.device == "measured" else None
        self.byte_scale = [p / a for p, a in zip(stage_param_counts(priced), stage_param_counts(self.model_cfg))]
        return CostModel(priced, cfg.trainer.micro_batches, micro_batch_size, cfg.network, flops_per_s=flops)

    def _iteration_seconds(self) -> float:
        if self.cfg.trainer.clock == "fixed":
            return self.cfg.failure.iteration_seconds
        return self.cost.iteration_seconds(self.schedule.name, redundant=self.strategy.name == "redundant")

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train; whatever happens, leave metrics.jsonl and a summary.json that says how it ended."""
        exit_code = 1
        try:
            self.setup()
            self.log = RunLog(self.run_dir, self.cfg.to_dict(), self.cfg.logger.wandb, self.cfg.trainer.iterations,
                              self.cfg.trainer.progress_bar)
            self.write_summary()
            self.train()
            self.status, exit_code = "completed", 0
        except KeyboardInterrupt:
            self.status, self.error = "interrupted", "interrupted by signal"
            raise
        except BaseException as exc:
            self.status, self.error = "error", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.write_summary()
            if self.log is not None:
                self.log.close(exit_code)
        return self.summary()

    def train(self) -> None:
        cfg = self.cfg.trainer
        self.totals.initial_val_loss = self.evaluate()
        self.log.log({"iteration": 0, "progress": 0, "sim_time_s": 0.0, "wall_time_s": 0.0,
                      "val_loss": self.totals.initial_val_loss, "failed_stages": [], "recoveries": [],
                      "lr": self.pipeline.stage_lrs()})
        self.start = time.perf_counter()
        for iteration in range(1, cfg.iterations + 1):
            record = self.iteration(iteration)
            evaluate = iteration % cfg.eval_every == 0 or iteration == cfg.iterations
            over_budget = cfg.sim_time_budget_s is not None and self.totals.sim_time_s >= cfg.sim_time_budget_s
            if evaluate or over_budget:
                record["val_loss"] = self.record_val_loss(self.evaluate())
            self.log.log(record)
            self.log.progress(record, len(self.totals.failures))
            if over_budget:
                break

    def iteration(self, iteration: int) -> dict:
        """One iteration: failures -> recovery -> step -> after-step -> clock. Returns its metrics record."""
        self.ctx.iteration = iteration
        t0 = self.totals.sim_time_s
        failed, events = self.draw_failures(iteration, t0)
        reports = self.recover(failed) if failed else []
        recovery_s = max((r.sim_seconds for r in reports), default=0.0)  # replacements recover in parallel

        batches = [self.corpus.train.next_batch(self.cfg.trainer.micro_batch_size)
                   for _ in range(self.cfg.trainer.micro_batches)]
        wall = time.perf_counter()
        result = self.pipeline.train_step(batches, self.schedule)
        step_wall = time.perf_counter() - wall
        self.check_finite(iteration, result)
        self.ctx.progress += 1
        self.ctx.grad_norm, self.ctx.grad_norm_post = result.grad_norm, result.grad_norm_post
        overhead_s = self.overhead_seconds(self.strategy.after_step(self.ctx))

        self.totals.sim_time_s = t0 + recovery_s + self.iteration_s + overhead_s
        self.totals.iterations = iteration
        self.totals.tokens += result.tokens
        self.totals.recovery_sim_s += recovery_s
        self.totals.overhead_sim_s += overhead_s
        return {
            "iteration": iteration, "progress": self.ctx.progress, "sim_time_s": self.totals.sim_time_s,
            "wall_time_s": time.perf_counter() - self.start, "train_loss": result.loss,
            "failed_stages": failed, "failure_times_s": [e.time_s for e in events],
            "recoveries": [r.to_dict() for r in reports], "lr": self.pipeline.stage_lrs(),
            "grad_norm": result.grad_norm, "grad_norm_post": result.grad_norm_post, "tokens": result.tokens,
            "throughput_tok_s": result.tokens / step_wall if step_wall > 0 else 0.0,
            "iteration_sim_s": self.iteration_s, "recovery_sim_s": recovery_s, "overhead_sim_s": overhead_s,
        }

    def draw_failures(self, iteration: int, t0: float) -> tuple[list[int], list[FailureEvent]]:
        """Events in [horizon, t0 + iteration time): every simulated second is covered exactly once,
        including the time spent recovering, so slower strategies meet more failures (as in reality)."""
        t_end = t0 + self.iteration_s
        events = [e for e in self.failures.events(iteration, self.failure_horizon, t_end) if e.stage in self.may_fail]
        self.failure_horizon = t_end
        failed = sorted({e.stage for e in events} | self.pending_failures)
        self.pending_failures = set()
        for e in events:
            self.totals.failures.append({"iteration": iteration, "stage": e.stage, "time_s": e.time_s})
        return failed, events

    def recover(self, failed: list[int]) -> list[RecoveryReport]:
        progress_before = self.ctx.progress
        reports = self.strategy.recover(set(failed), self.ctx)
        for report in reports:
            # A rollback downloads every stage's shard in parallel: the largest one bounds the time.
            n_bytes = report.details.get("largest_shard_bytes", report.bytes_moved) if report.from_storage \
                else report.bytes_moved
            n_bytes = int(n_bytes * self.byte_scale[report.stage])
            report.sim_seconds = self.cost.recovery_seconds(report.stage, report.sources, n_bytes,
                                                            from_storage=report.from_storage)
            self.totals.recoveries.append({"iteration": self.ctx.iteration, "stage": report.stage,
                                           "method": report.method, "sources": report.sources})
        self.totals.lost_iterations += progress_before - self.ctx.progress
        return reports

    def overhead_seconds(self, overhead: StepOverhead) -> float:
        scale = max(self.byte_scale)
        scaled = StepOverhead(
            storage_upload_bytes=int(overhead.storage_upload_bytes * scale),
            replica_sync_bytes={k: int(v * scale) for k, v in overhead.replica_sync_bytes.items()},
        )
        return self.cost.overhead_seconds(scaled)

    def check_finite(self, iteration: int, result: StepResult) -> None:
        bad = [i for i, n in enumerate(result.grad_norm) if not math.isfinite(n)]
        bad += [i for i in self.pipeline.nonfinite_stages() if i not in bad]
        if math.isfinite(result.loss) and not bad:
            return
        where = f"stage(s) {sorted(bad)}" if bad else "the loss"
        if self.cfg.trainer.on_nonfinite == "error" or not bad:
            raise NonFiniteError(f"non-finite values at iteration {iteration} in {where} (loss={result.loss}); "
                                 "lower trainer.lr, or set trainer.on_nonfinite=recover.")
        self.pending_failures |= set(bad)

    # --- evaluation and bookkeeping ----------------------------------------------------------------

    def evaluate(self) -> float:
        return self.pipeline.evaluate(self.corpus.val, self.cfg.trainer.eval_batch_size)

    def record_val_loss(self, loss: float) -> float:
        t = self.totals
        t.final_val_loss = loss
        t.best_val_loss = loss if t.best_val_loss is None else min(t.best_val_loss, loss)
        target = self.cfg.trainer.target_loss
        if target is not None and t.time_to_target_s is None and loss <= target:
            t.time_to_target_s, t.iterations_to_target = t.sim_time_s, t.iterations
        return loss

    def summary(self) -> dict:
        t, cfg = self.totals, self.cfg
        by_method: dict[str, int] = {}
        for r in t.recoveries:
            by_method[r["method"]] = by_method.get(r["method"], 0) + 1
        strategy = getattr(self, "strategy", None)
        return {
            "status": self.status, "error": self.error, "run_dir": str(self.run_dir),
            "strategy": cfg.strategy.name, "failure": cfg.failure.name, "hourly_rate": cfg.failure.hourly_rate,
            "seed": cfg.seed, "model": cfg.model.name, "engine": cfg.engine.name,
            "iterations": t.iterations, "tokens": t.tokens,
            "total_sim_time_s": t.sim_time_s, "iteration_sim_s": getattr(self, "iteration_s", None),
            "recovery_sim_s": t.recovery_sim_s, "overhead_sim_s": t.overhead_sim_s,
            "total_wall_time_s": time.perf_counter() - self.start if hasattr(self, "start") else 0.0,
            "n_failures": len(t.failures), "n_recoveries": len(t.recoveries), "recoveries_by_method": by_method,
            "lost_iterations": t.lost_iterations, "failures": t.failures, "recoveries": t.recoveries,
            "memory_overhead_bytes": strategy.memory_overhead_bytes() if strategy else 0,
            "initial_val_loss": t.initial_val_loss, "final_val_loss": t.final_val_loss,
            "best_val_loss": t.best_val_loss, "target_loss": cfg.trainer.target_loss,
            "time_to_target_s": t.time_to_target_s, "iterations_to_target": t.iterations_to_target,
            "config": cfg.to_dict(),
        }

    def write_summary(self) -> None:
        if self.log is not None:
            self.log.summary(self.summary())


def train(cfg: RunConfig, run_dir: Path | str) -> dict:
    """Run one training job into ``run_dir``; returns the summary."""
    return Trainer(cfg, Path(run_dir)).run()


__all__ = ["Trainer", "train", "NonFiniteError", "Interrupted", "UnrecoverableFailure"]
