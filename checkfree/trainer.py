"""The training loop: failure events -> recovery -> step -> after-step -> clock -> eval -> log.

One iteration, top to bottom (DESIGN §4):

1. The failure model yields the events that fall in this iteration's simulated time window; the
   strategy rebuilds *all* lost stages at once, using only survivors as sources.
2. The pipeline runs ``M`` micro-batches in the strategy's schedule, clips per stage and steps.
3. The strategy's after-step hook runs (checkpoint upload, replica sync) and reports its traffic.
4. The simulated clock advances by the cost model's iteration time + recovery + overheads.
5. Every ``eval_every`` iterations, validation on the held-out split.
6. One JSON line per iteration to ``metrics.jsonl``; ``summary.json`` is written however the run ends.

Numeric guard: a non-finite loss or gradient skips the optimizer step (so one stage's NaN never reaches
the others), and the stage it came from is named: ``trainer.on_nonfinite=error`` stops the run with the
iteration and stage, ``recover`` treats that stage as failed at the next iteration (a failure with cause
"nonfinite") and rebuilds it with the run's strategy.

Resume: with ``trainer.save_every=N`` the whole run state (weights, optimizers, strategy, failure model,
data position, RNG, totals) goes to ``<run_dir>/resume/state.pt`` every N iterations, at the end, and when
the run is interrupted or fails *between* iterations (a state caught mid-iteration is never saved).
``trainer.resume=DIR`` continues the run in ``DIR`` itself: ``DIR/metrics.jsonl`` is cut back to the saved
iteration and appended to, ``DIR/summary.json`` is rewritten, checkpoints stay where they are. The result
is the same, record for record and weight for weight, as a run that never stopped. Only the keys of
``checkfree.resume.MAY_CHANGE`` may differ from the saved config (e.g. a larger ``trainer.iterations`` to
train on). From the command line a new Hydra directory is still created for the job; it holds only
Hydra's own files (add ``hydra.run.dir=DIR`` to keep everything in one place).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from checkfree.config import ConfigError
from checkfree.cost import CostModel, StepOverhead, measure_flops
from checkfree.data import Corpus, load_corpus
from checkfree.failures import FailureEvent, build_failure_model, failing_stages
from checkfree.model import build_stages, preset, stage_param_counts
from checkfree.pipeline import LocalPipeline, StepResult
from checkfree.recovery import RecoveryContext, RecoveryReport, build_strategy
from checkfree.recovery.base import UnrecoverableFailure
from checkfree.recovery.checkpoint import CheckpointRollback
from checkfree.resume import check_same_config, load_state, save_state, state_path, truncate_metrics
from checkfree.runconfig import RunConfig
from checkfree.runlog import RunLog
from checkfree.schedule import build_schedule


class NonFiniteError(RuntimeError):
    """A non-finite loss or weight, with the iteration and stage in the message."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: stop, and say so in summary.json."""

    signum: int = signal.SIGINT
    """The signal that stopped the run (the CLI exits with 128 + signum)."""


def interrupted(signum: int) -> Interrupted:
    exc = Interrupted(f"signal {signum}")
    exc.signum = signum
    return exc


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
        # A resumed run continues in the interrupted run's own directory (module docstring).
        self.run_dir = Path(cfg.trainer.resume) if cfg.trainer.resume else Path(run_dir)
        self.totals = Totals()
        self.status, self.error = "running", None
        self.log: RunLog | None = None
        self.resume_state: dict | None = None
        self.resumed_at: list[int] = []
        """Iterations after which this run was resumed (in order)."""
        self.consistent_at: int | None = None
        """The iteration whose end the run state is at, or None while an iteration is under way."""
        self.saved_at: int | None = None
        """The iteration of the resumable state on disk (None: none saved)."""
        self.stop_signal: int | None = None
        """A signal that arrived mid-iteration and waits for the iteration to end (see run)."""

    # --- set-up --------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.trainer.resume:
            # Before any work: a missing state or a changed config fails in a second, writing nothing.
            self.resume_state = load_state(self.run_dir)
            check_same_config(self.resume_state["config"], cfg.to_dict(), self.run_dir)
            done = self.resume_state["iteration"]
            if cfg.trainer.iterations < done:
                raise ConfigError(f"trainer.iterations={cfg.trainer.iterations} is invalid with "
                                  f"trainer.resume={str(self.run_dir)!r}: the saved run is already at "
                                  f"iteration {done}; allowed >= {done}.")
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
        # On resume too: setup builds what the strategy derives from the start (the checkpoint strategy's
        # progress-0 file is rewritten identically), then load_state_dict puts the saved state over it.
        self.strategy.setup(self.ctx)
        self.failure_horizon = 0.0  # simulated time up to which failure events have been drawn
        self.pending_failures: set[int] = set()  # stages marked failed by the numeric guard
        if self.resume_state is not None:
            self.load_state_dict(self.resume_state)

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
            if self.resume_state is not None:
                truncate_metrics(self.run_dir / "metrics.jsonl", self.resume_state["iteration"])
            else:
                # A fresh run in a reused directory: a state left by an earlier run there must never be
                # resumed under this run's metrics.
                state_path(self.run_dir).unlink(missing_ok=True)
            self.log = RunLog(self.run_dir, self.cfg.to_dict(), self.cfg.logger.wandb, self.cfg.trainer.iterations,
                              self.cfg.trainer.progress_bar, resume=self.resume_state is not None)
            self.write_summary()
            with self._stop_between_iterations():
                self.train()
            self.status, exit_code = "completed", 0
        except KeyboardInterrupt:
            self.status, self.error = "interrupted", "interrupted by signal"
            raise
        except BaseException as exc:
            self.status, self.error = "error", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            # A second Ctrl-C (or SIGTERM) must not cut the last state or summary short.
            with _signals_deferred():
                self._save_on_exit()
                self.write_summary()
            if self.log is not None:
                self.log.close(exit_code)
        return self.summary()

    def train(self) -> None:
        cfg = self.cfg.trainer
        if self.resume_state is None:
            self.totals.initial_val_loss = self.evaluate()
            self.log.log({"iteration": 0, "progress": 0, "sim_time_s": 0.0, "wall_time_s": 0.0,
                          "val_loss": self.totals.initial_val_loss, "failed_stages": [], "recoveries": [],
                          "lr": self.pipeline.stage_lrs()})
            self.start, first = time.perf_counter(), 1
        else:
            # Wall time goes on from where the interrupted run stopped, so wall_time_s stays monotone.
            self.start = time.perf_counter() - self.resume_state["wall_time_s"]
            first = self.resume_state["iteration"] + 1
            self.resume_state = None  # the tensors are in the live objects now; free the copies
            self.log.bar.update(first - 1)
        self.consistent_at = first - 1
        for iteration in range(first, cfg.iterations + 1):
            self._stop_if_asked()
            if cfg.sim_time_budget_s is not None and self.totals.sim_time_s >= cfg.sim_time_budget_s:
                break  # only a resumed run gets here: a fresh one stops right after the iteration that crossed
            self.consistent_at = None  # from here until its record is logged, the run is mid-iteration
            record = self.iteration(iteration)
            evaluate = iteration % cfg.eval_every == 0 or iteration == cfg.iterations
            over_budget = cfg.sim_time_budget_s is not None and self.totals.sim_time_s >= cfg.sim_time_budget_s
            if evaluate or over_budget:
                record["val_loss"] = self.record_val_loss(self.evaluate())
            self.log.log(record)
            self.consistent_at = iteration
            self.log.progress(record, len(self.totals.failures))
            if cfg.save_every and iteration % cfg.save_every == 0:
                self.save_state()
            if over_budget:
                break
        if cfg.save_every:
            self.save_state()  # the final state: `trainer.iterations=<more> trainer.resume=DIR` trains on

    def iteration(self, iteration: int) -> dict:
        """One iteration: failures -> recovery -> step -> after-step -> clock. Returns its metrics record."""
        self.ctx.iteration = iteration
        t0 = self.totals.sim_time_s
        failed, events = self.draw_failures(iteration, t0)
        reports = self.recover(failed) if failed else []
        recovery_s = max((r.sim_seconds for r in reports), default=0.0)  # replacements recover in parallel

        batches = [self.corpus.train.next_batch(self.cfg.trainer.micro_batch_size)
                   for _ in range(self.cfg.trainer.micro_batches)]
        self.before_step(iteration, batches)
        wall = time.perf_counter()
        result = self.pipeline.train_step(batches, self.schedule, skip_nonfinite=True)
        step_wall = time.perf_counter() - wall
        nonfinite = self.check_finite(iteration, result, batches)
        overhead_s = 0.0
        if result.stepped:
            self.ctx.progress += 1
            # A skipped step keeps the last finite norms: CheckFree weighs neighbours by them.
            self.ctx.grad_norm, self.ctx.grad_norm_post = result.grad_norm, result.grad_norm_post
        if result.stepped and not nonfinite:
            # Never after a non-finite state: no checkpoint, replica or shadow may hold a NaN.
            overhead_s = self.overhead_seconds(self.strategy.after_step(self.ctx))

        self.totals.sim_time_s = t0 + recovery_s + self.iteration_s + overhead_s
        self.totals.iterations = iteration
        self.totals.tokens += result.tokens
        self.totals.recovery_sim_s += recovery_s
        self.totals.overhead_sim_s += overhead_s
        record = {
            "iteration": iteration, "progress": self.ctx.progress, "sim_time_s": self.totals.sim_time_s,
            "wall_time_s": time.perf_counter() - self.start, "train_loss": result.loss,
            "failed_stages": failed, "failure_times_s": [e.time_s for e in events],
            "recoveries": [r.to_dict() for r in reports], "lr": self.pipeline.stage_lrs(),
            "grad_norm": result.grad_norm, "grad_norm_post": result.grad_norm_post, "tokens": result.tokens,
            "throughput_tok_s": result.tokens / step_wall if step_wall > 0 else 0.0,
            "iteration_sim_s": self.iteration_s, "recovery_sim_s": recovery_s, "overhead_sim_s": overhead_s,
        }
        if nonfinite or not result.stepped:
            record.update(step_skipped=not result.stepped, nonfinite_stages=nonfinite)
        return record

    def before_step(self, iteration: int, batches: list[torch.Tensor]) -> None:
        """Called right before each optimizer step (after recovery). A no-op: tests override it to inject
        faults (a poisoned weight, an interruption) at an exact point of the loop."""

    def draw_failures(self, iteration: int, t0: float) -> tuple[list[int], list[FailureEvent]]:
        """Events in [horizon, t0 + iteration time): every simulated second is covered exactly once,
        including the time spent recovering, so slower strategies meet more failures (as in reality).
        Stages the numeric guard marked (``on_nonfinite=recover``) fail here too, with cause "nonfinite"."""
        t_end = t0 + self.iteration_s
        events = [e for e in self.failures.events(iteration, self.failure_horizon, t_end) if e.stage in self.may_fail]
        self.failure_horizon = t_end
        failed = sorted({e.stage for e in events} | self.pending_failures)
        for e in events:
            self.totals.failures.append({"iteration": iteration, "stage": e.stage, "time_s": e.time_s})
        for stage in sorted(self.pending_failures - {e.stage for e in events}):  # a stage is lost once
            self.totals.failures.append({"iteration": iteration, "stage": stage, "time_s": t0,
                                         "cause": "nonfinite"})
        self.pending_failures = set()
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

    def check_finite(self, iteration: int, result: StepResult,
                     batches: list[torch.Tensor] | None = None) -> list[int]:
        """The stages a non-finite loss, gradient or weight came from (empty when all is finite).

        With ``on_nonfinite=error`` (or when no stage can be blamed) raise NonFiniteError naming the
        iteration and the stages; with ``recover`` mark them failed for the next iteration.
        """
        bad_weights = self.pipeline.nonfinite_stages()
        if result.stepped and math.isfinite(result.loss) and not bad_weights:
            return []
        stages, why = self._blame(result, bad_weights, batches or [])
        what = f"stage(s) {stages} ({why})" if stages else "no one stage (all weights and outputs are finite)"
        if result.stepped:
            step = "the optimizer step had already run"
        else:
            step = "the optimizer step was skipped, so no other stage took in the NaN"
        message = f"non-finite values at iteration {iteration} (loss={result.loss}) in {what}; {step}. "
        if self.cfg.trainer.on_nonfinite == "error" or not stages:
            raise NonFiniteError(message + "Lower trainer.lr, or set trainer.on_nonfinite=recover to rebuild "
                                 f"the stage with strategy={self.strategy.name}.")
        self.pending_failures |= set(stages)
        return stages

    def _blame(self, result: StepResult, bad_weights: list[int],
               batches: list[torch.Tensor]) -> tuple[list[int], str]:
        """Most specific first: stages with non-finite weights; else the first stage whose forward output is
        non-finite (a NaN spreads to every later output and to every stage's gradient, so only its origin
        means anything); else the stages whose gradient norm is non-finite."""
        if bad_weights:
            return bad_weights, "non-finite weights"
        if not math.isfinite(result.loss):
            for m, batch in enumerate(batches):
                origin = self.pipeline.first_nonfinite_output(batch[:, :-1], self.schedule.order(m))
                if origin is not None:
                    return [origin], "the first non-finite output of the forward pass"
        return [i for i, n in enumerate(result.grad_norm) if not math.isfinite(n)], "non-finite gradients"

    # --- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the next iteration depends on, at an iteration boundary (see ``save_state``)."""
        p, t = self.pipeline, self.totals
        return {
            "iteration": self.consistent_at, "config": self.cfg.to_dict(),
            "wall_time_s": time.perf_counter() - self.start if hasattr(self, "start") else 0.0,
            "stages": [stage.state_dict() for stage in p.stages],
            "optimizers": [opt.state_dict() for opt in p.optimizers],  # lr included: recovered stages differ
            "strategy": self.strategy.state_dict(), "strategy_files": self._strategy_files(),
            "failures": self.failures.state_dict(), "data": self.corpus.train.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "totals": asdict(t), "progress": self.ctx.progress, "grad_norm": self.ctx.grad_norm,
            "grad_norm_post": self.ctx.grad_norm_post, "failure_horizon": self.failure_horizon,
            "pending_failures": sorted(self.pending_failures), "iteration_s": self.iteration_s,
            "resumed_at": list(self.resumed_at),
        }

    def load_state_dict(self, state: dict) -> None:
        for stage, saved in zip(self.pipeline.stages, state["stages"], strict=True):
            stage.load_state_dict(saved)
        for k, saved in enumerate(state["optimizers"]):
            self.pipeline.reset_optimizer(k, self.cfg.trainer.lr)
            self.pipeline.optimizers[k].load_state_dict(saved)
        self.strategy.load_state_dict(state["strategy"])
        self._restore_strategy_files(state["strategy_files"])
        self.failures.load_state_dict(state["failures"])
        self.corpus.train.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.totals = Totals(**state["totals"])
        self.ctx.progress, self.ctx.iteration = state["progress"], state["iteration"]
        self.ctx.grad_norm, self.ctx.grad_norm_post = state["grad_norm"], state["grad_norm_post"]
        self.failure_horizon, self.pending_failures = state["failure_horizon"], set(state["pending_failures"])
        # Kept, not recomputed: a measured device throughput would give another clock on another machine.
        self.iteration_s = state["iteration_s"]
        self.resumed_at = [*state["resumed_at"], state["iteration"]]
        self.saved_at = state["iteration"]

    def save_state(self) -> None:
        """Write the resumable state, if the run is at an iteration boundary (never a mid-iteration one)."""
        if self.consistent_at is None or self.consistent_at == self.saved_at:
            return
        save_state(self.run_dir, self.state_dict())
        self.saved_at = self.consistent_at

    def _stop_if_asked(self) -> None:
        if self.stop_signal is not None:
            self.save_state()
            raise interrupted(self.stop_signal)

    @contextlib.contextmanager
    def _stop_between_iterations(self) -> Iterator[None]:
        """With ``save_every`` > 0, SIGINT/SIGTERM arriving mid-iteration let that iteration finish, so the
        state saved on the way out is the one at the signal rather than at the last periodic save; a second
        signal, or one between iterations, stops at once. (Without saving there is nothing to wait for.)"""
        if not self.cfg.trainer.save_every or threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be set from the main thread
            return

        def handler(signum: int, frame: object) -> None:
            if self.consistent_at is None and self.stop_signal is None:
                self.stop_signal = signum
                print(f"signal {signum}: finishing iteration {self.ctx.iteration}, saving, then stopping "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
                return
            raise interrupted(signum)

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _save_on_exit(self) -> None:
        """Interrupted or failed between two iterations: keep that state too, so a resume loses nothing."""
        if not self.cfg.trainer.save_every or self.log is None or self.status == "completed":
            return
        try:
            self.save_state()
        except Exception as exc:  # the original error is what the user must see; say this one in the summary
            self.error = f"{self.error}; the resumable state could not be saved ({type(exc).__name__}: {exc})"

    def _strategy_files(self) -> dict[str, bytes]:
        # The rollback target lives in a file the strategy prunes (keep=N): a state saved earlier may point
        # at a checkpoint deleted since. The state carries the file itself, so a resume can always restore it.
        if isinstance(self.strategy, CheckpointRollback) and self.strategy.latest is not None:
            return {self.strategy.latest.name: self.strategy.latest.read_bytes()}
        return {}

    def _restore_strategy_files(self, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            path = self.strategy.directory / name
            tmp = path.with_name(name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.strategy.latest = path  # the saved absolute path may be stale if DIR was moved

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
            # Where to continue from: `trainer.resume=<run_dir>` restarts after this iteration.
            "resumable_from_iteration": self.saved_at,
            "resume_state": str(state_path(self.run_dir)) if self.saved_at is not None else None,
            "resumed_at_iterations": self.resumed_at,
            "config": cfg.to_dict(),
        }

    def write_summary(self) -> None:
        if self.log is not None:
            self.log.summary(self.summary())


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block are noted and dropped: the run is already on its way out
    (writing its last state and summary), and a second signal must not leave them half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed from the main thread; other threads never receive them
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: None)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, run_dir: Path | str) -> dict:
    """Run one training job into ``run_dir`` (with ``trainer.resume=DIR``: on in DIR); returns the summary."""
    return Trainer(cfg, Path(run_dir)).run()


__all__ = ["Trainer", "train", "NonFiniteError", "Interrupted", "interrupted", "UnrecoverableFailure"]
