"""How a run starts, goes on and ends: the loop over iterations, the result files, resume and signals.

``run(trainer)`` trains for ``trainer.iterations``, evaluating every ``eval_every``, and guarantees what a
run leaves behind, however it ends: ``metrics.jsonl`` (one line per iteration, never a torn one),
``summary.json`` (written at the start and again at the end, with ``status`` completed | error |
interrupted), the model it trained (``model/``, a Hugging Face directory, when the run ends between two
iterations) and, with ``trainer.save_every=N``, a resumable state.

Resume: the whole run state (engine weights, optimizers and held copies, checkpoints, failure model, data
position, RNG, totals) goes to ``<run_dir>/resume/state.pt`` every N iterations, at the end, and when the
run is interrupted or fails *between* iterations (a state caught mid-iteration is never saved).
``trainer.resume=DIR`` continues the run in ``DIR`` itself: ``metrics.jsonl`` is cut back to the saved
iteration and appended to, ``summary.json`` is rewritten, checkpoints stay where they are. The result is
the same, record for record and weight for weight, as a run that never stopped.

Signals: a SIGINT/SIGTERM while the run trains lets the iteration under way finish and stops before the next
(with ``save_every`` > 0 the state saved on the way out is the one at the signal); a second signal stops at
once. Once the run is on its way out (saving, exporting, writing the summary, closing wandb and the engine),
signals are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from checkfree.run.provenance import environment, label, version_warning
from checkfree.run.records import IterationRecord
from checkfree.run.resume import save_state, state_path, truncate_metrics
from checkfree.run.rundir import owned
from checkfree.run.runlog import RunLog
from checkfree.storage.atomic import os_error_behind, signals_to
from checkfree.trainer import SimTimeSpent, Trainer

DIVERGED_FACTOR = 1.1
"""A run whose final validation loss ends above this factor times its initial one has diverged."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: stop, and say so in summary.json."""

    signum: int = signal.SIGINT
    """The signal that stopped the run (the CLI exits with 128 + signum)."""


def interrupted(signum: int) -> Interrupted:
    exc = Interrupted(f"signal {signum}")
    exc.signum = signum
    return exc


_requested: list[int] = []
"""The signal the command line's handler raised on (``request_stop``), in case its exception never arrives."""


def request_stop(signum: int) -> None:
    """A stop asked by a signal handler that also raises: Python drops an exception raised while the main
    thread runs a finalizer (``__del__``, a weakref callback: "Exception ignored in ..."), and the run would
    train on with the signals ignored. The next iteration boundary stops it then (``Run._stop_if_asked``)."""
    if not _requested:
        _requested.append(signum)


class Run:
    """One run of a trainer into its run directory."""

    def __init__(self, trainer: Trainer, resume_state: dict | None = None) -> None:
        self.trainer, self.resume_state = trainer, resume_state
        self.cfg, self.run_dir = trainer.cfg, trainer.run_dir
        self.status, self.error = "running", None
        self.warnings: list[str] = []
        self.resumed_at: list[int] = []
        """Iterations after which this run was resumed (in order)."""
        self.consistent_at: int | None = None
        """The iteration whose end the run state is at, or None while an iteration is under way."""
        self.saved_at: int | None = None
        """The iteration of the resumable state on disk (None: none saved)."""
        self.stop_signal: int | None = None
        """A signal that arrived mid-iteration and waits for the iteration to end."""
        self.model_dir: Path | None = None
        self.failure: BaseException | None = None
        self.log: RunLog | None = None
        """metrics.jsonl, summary.json, the progress bar and wandb: the run's, opened once the engine runs."""

    def run(self) -> dict:
        """Own the run directory (one run at a time: ``checkfree.run.rundir``), then train."""
        with owned(self.run_dir, resume=self.resume_state is not None):
            return self._run()

    def _run(self) -> dict:
        """Train; whatever happens, leave metrics.jsonl and a summary.json that says how it ended."""
        exit_code, t = 1, self.trainer
        try:
            _ = self.environment  # the tokens hashed before the engine's workers start waiting for work
            self.warn(version_warning(self.cfg.data.name, t.corpus.packages))
            t.engine.start(self.run_dir, fresh=self.resume_state is None)
            if self.resume_state is not None:
                from checkfree.storage.export_paths import clear_stale_exports

                clear_stale_exports(self.run_dir / "model")  # the killed run's half-written export, if any
                self.load_state_dict(self.resume_state)
                truncate_metrics(self.run_dir / "metrics.jsonl", self.resume_state["iteration"])
            else:
                t.upkeep(t.strategy.setup(t.view()))
            self.log = RunLog(self.run_dir, self.cfg.to_dict(), self.cfg.logger.wandb, self.cfg.trainer.iterations,
                              self.cfg.trainer.progress_bar, resume=self.resume_state is not None)
            self.write_summary()
            with self._stop_between_iterations():
                self.train()
            self.status, exit_code = "completed", 0
            self.check_divergence()
        except KeyboardInterrupt:
            self.status, self.error = "interrupted", "interrupted by signal"
            raise
        except BaseException as exc:
            self.status, self.error, self.failure = "error", f"{type(exc).__name__}: {exc}", exc
            raise
        finally:
            # A second Ctrl-C (or SIGTERM) must not cut the last state, model or summary short, nor wandb's
            # finish or the stop of the workers (a KeyboardInterrupt in there left them running).
            with _signals_deferred():
                self.stop_wall_failures()  # no process killed while the run saves and stops them
                self._save_on_exit()
                self._export()
                self.write_summary()
                try:
                    if self.log is not None:
                        self.log.close(exit_code)
                finally:  # a failed fsync of metrics.jsonl still stops the workers
                    t.engine.close()
        return self.summary()

    def train(self) -> None:
        t, cfg = self.trainer, self.cfg.trainer
        if self.resume_state is None:
            record = IterationRecord(0)
            record.stepped(progress=0, sim_time_s=0.0, wall_time_s=0.0, lr=t.engine.stage_lrs())
            t.totals.initial_val_loss = record.val_loss = t.evaluate(record)
            self.log.log(record.to_dict())
            first = 1
        else:
            first = self.resume_state["iteration"] + 1
            self.resume_state = None  # the tensors are in the live objects now; free the copies
            self.log.bar.update(first - 1)
        self.consistent_at = first - 1
        if t.wall_failures is not None:
            t.wall_failures.start()  # losses at their wall times from here on, until the last iteration ends
        try:
            self._iterate(first)
        finally:
            self.stop_wall_failures()
        if cfg.save_every:
            self.save_state()  # the final state: `trainer.iterations=<more> trainer.resume=DIR` trains on
        t.totals.final_val_loss_se = t.validation_se()

    def stop_wall_failures(self) -> None:
        """The thread that kills processes on the wall clock stopped, and the kills it made written down: the same
        losses, as a trace the simulated clock can replay (``wall_failures.json``)."""
        wall = self.trainer.wall_failures
        if wall is not None and wall.t0 is not None:
            wall.stop()
            wall.write_trace(self.run_dir / "wall_failures.json")

    def _iterate(self, first: int) -> None:
        t, cfg = self.trainer, self.cfg.trainer
        for iteration in range(first, cfg.iterations + 1):
            self._stop_if_asked()
            if cfg.sim_time_budget_s is not None and t.totals.sim_time_s >= cfg.sim_time_budget_s:
                break  # only a resumed run gets here: a fresh one stops right after the iteration that crossed
            self.consistent_at = None  # from here until its record is logged, the run is mid-iteration
            try:
                record = t.iteration(iteration)
            except SimTimeSpent:  # the budget ran out before the iteration could finish: it never happened
                break
            over_budget = cfg.sim_time_budget_s is not None and t.totals.sim_time_s >= cfg.sim_time_budget_s
            if iteration % cfg.eval_every == 0 or iteration == cfg.iterations or over_budget:
                record.val_loss = t.evaluate(record)
            line = record.to_dict()
            self.log.log(line)
            self.consistent_at = iteration
            self.log.progress(line, len(t.totals.failures))
            if cfg.save_every and iteration % cfg.save_every == 0:
                self.save_state()
            if over_budget or (cfg.stop_at_target and t.totals.time_to_target_s is not None):
                break

    def warn(self, text: str | None) -> None:
        """A warning for the summary and stderr (None: nothing to say)."""
        if text:
            self.warnings.append(text)
            print(f"warning: {text}", file=sys.stderr)

    def check_divergence(self) -> None:
        t = self.trainer.totals
        if t.initial_val_loss is None or t.final_val_loss is None:
            return
        if not math.isfinite(t.final_val_loss) or t.final_val_loss > DIVERGED_FACTOR * t.initial_val_loss:
            text = (f"the run diverged: its validation loss ended at {t.final_val_loss:.4g}, above the "
                    f"{t.initial_val_loss:.4g} it started from; lower trainer.lr (now {self.cfg.trainer.lr:g}).")
            self.warn(text)

    # --- resume ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the next iteration depends on, at an iteration boundary (see ``save_state``): the
        trainer's state, and the run's own (where it is, its config, when it was resumed)."""
        return {**self.trainer.state_dict(), "iteration": self.consistent_at, "config": self.cfg.to_dict(),
                "resumed_at": list(self.resumed_at), "environment": self.environment}

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)
        self.resumed_at = [*state["resumed_at"], state["iteration"]]
        self.saved_at = state["iteration"]
        saved = state.get("environment")  # None: a state saved before states carried it
        if saved is not None and saved != self.environment:
            # Allowed (a resume on an upgraded machine is legitimate), but the summary names one environment:
            # the iterations before the resume ran in another, and must not pass for this one's.
            text = (f"resumed in another environment: the iterations up to {state['iteration']} ran with "
                    f"{label(saved)}, the rest with {label(self.environment)}; the run's numbers need not "
                    "match either environment's to the digit.")
            self.warn(text)

    def save_state(self) -> None:
        """Write the resumable state, if the run is at an iteration boundary (never a mid-iteration one)."""
        if self.consistent_at is None or self.consistent_at == self.saved_at:
            return
        # A stage lost while the state is gathered is recovered and the gathering redone (``Trainer.between``);
        # the file is replaced only once the whole state is in hand, so the previous save stays whole meanwhile.
        save_state(self.run_dir, self.trainer.between(self.state_dict))
        self.saved_at = self.consistent_at

    def _save_on_exit(self) -> None:
        """Interrupted or failed between two iterations: keep that state too, so a resume loses nothing."""
        if not self.cfg.trainer.save_every or self.log is None or self.status == "completed":
            return
        if getattr(os_error_behind(self.failure), "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return  # the disk is full: a second attempt would only fail the same way
        try:
            self.save_state()
        except Exception as exc:  # the original error is what the user must see; say this one in the summary
            self.error = f"{self.error}; the resumable state could not be saved ({type(exc).__name__}: {exc})"

    def _export(self) -> None:
        """The model the run trained, as a Hugging Face directory (when its state is whole and finite)."""
        t = self.trainer
        if not self.cfg.trainer.export or self.log is None or self.consistent_at is None or self.status == "error" \
                or t.engine.nonfinite_stages():
            return
        from checkfree.model.hf_export import export_model

        try:
            self.model_dir = export_model(t.between(t.engine.stage_states), t.model, t.corpus.tokenizer,
                                         self.run_dir / "model")
        except Exception as exc:  # never hide how the run itself ended; say this in the summary
            self.warnings.append(f"the model could not be exported ({type(exc).__name__}: {exc})")

    # --- signals -----------------------------------------------------------------------------------------

    def _stop_if_asked(self) -> None:
        signum = self.stop_signal if self.stop_signal is not None else next(iter(_requested), None)
        if signum is not None:
            if self.cfg.trainer.save_every:
                self.save_state()
            raise interrupted(signum)

    @contextlib.contextmanager
    def _stop_between_iterations(self) -> Iterator[None]:
        """A first SIGINT/SIGTERM is noted, never raised: the run stops at the top of the next iteration
        (``_stop_if_asked``), so the state saved on the way out (``save_every`` > 0) is the one at the signal
        rather than at the last periodic save. Raised at whatever instruction the main thread is at, the
        KeyboardInterrupt could land inside a library's lock (wandb's logging, an import under way) and leave
        it held for the teardown to wait on forever (the likely cause of a silent hang after a Ctrl-C, seen
        twice in fresh-clone test runs with wandb offline and no saving). A second signal still stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # handlers can only be set from the main thread
            return

        def handler(signum: int, frame: object) -> None:
            if self.stop_signal is None:
                self.stop_signal = signum
                saving = "saving, " if self.cfg.trainer.save_every else ""
                print(f"signal {signum}: finishing iteration {self.trainer.iteration_no}, {saving}then stopping "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
                return
            raise interrupted(signum)

        with signals_to(handler):
            yield

    # --- the summary -------------------------------------------------------------------------------------

    @functools.cached_property
    def environment(self) -> dict[str, str]:
        """Library versions and the tokens' digest (``checkfree.run.provenance``): hashed once per run."""
        return environment(self.trainer.corpus)

    def summary(self) -> dict:
        t, cfg, log = self.trainer.totals, self.cfg, self.log
        by_method: dict[str, int] = {}
        for r in t.recoveries:
            by_method[r["method"]] = by_method.get(r["method"], 0) + 1
        diverged = any(w.startswith("the run diverged") for w in self.warnings)
        return {
            "status": self.status, "error": self.error, "diverged": diverged, "warnings": list(self.warnings),
            "run_dir": str(self.run_dir), "strategy": cfg.strategy.name, "failure": cfg.failure.name,
            "hourly_rate": cfg.failure.hourly_rate, "seed": cfg.seed, "model": cfg.model.name,
            "engine": cfg.engine.name, "iterations": t.iterations, "tokens": t.tokens,
            "total_sim_time_s": t.sim_time_s, "iteration_sim_s": self.trainer.clock.home[0],
            "link_busy_fraction": self.trainer.clock.link_busy,
            "recovery_sim_s": t.recovery_sim_s, "overhead_sim_s": t.overhead_sim_s,
            "lost_work_sim_s": t.lost_work_sim_s,
            # Without replacement nodes (failure.replacement): the pipeline's stalls, and its time on fewer hosts.
            "waiting_sim_s": t.waiting_sim_s, "moving_sim_s": t.moving_sim_s, "shrunk_sim_s": t.shrunk_sim_s,
            "min_live_hosts": self.trainer.hosts.min_live, "max_stages_per_host": self.trainer.hosts.most_per_host,
            # Nodes, not stages (engine.replicas; docs/design.md, 'Nodes and replicas').
            **self.trainer.node_counts(),
            "total_wall_time_s": self.trainer.wall_time(),
            "n_failures": len(t.failures), "n_recoveries": len(t.recoveries), "recoveries_by_method": by_method,
            "lost_iterations": t.lost_iterations, "failures": t.failures, "recoveries": t.recoveries,
            **({"wall_failures": self.trainer.wall_failures.kills} if self.trainer.wall_failures is not None else {}),
            "memory_overhead_bytes": self.trainer.engine.held_bytes(),
            "memory_overhead_bytes_per_node": self.trainer.engine.held_bytes_per_node(),
            # The same, and the bytes the run moved, at the size the clock prices (trainer.clock_preset).
            "memory_overhead_priced_bytes_per_node": self.trainer.priced_memory_per_node(),
            "moved_priced_bytes": self.trainer.clock.moved_bytes,
            "initial_val_loss": t.initial_val_loss, "final_val_loss": t.final_val_loss,
            "best_val_loss": t.best_val_loss, "target_loss": cfg.trainer.target_loss,
            "time_to_target_s": t.time_to_target_s, "iterations_to_target": t.iterations_to_target,
            "time_to_target_interp_s": t.time_to_target_interp_s,
            "iterations_to_target_interp": t.iterations_to_target_interp, "final_val_loss_se": t.final_val_loss_se,
            "val_sequences": int(self.trainer.corpus.val.shape[0]),
            # Where to continue from: `trainer.resume=<run_dir>` restarts after this iteration.
            "resumable_from_iteration": self.saved_at,
            "resume_state": str(state_path(self.run_dir)) if self.saved_at is not None else None,
            "resumed_at_iterations": self.resumed_at,
            "model_dir": str(self.model_dir) if self.model_dir is not None else None,
            "wandb_dir": str(log.wandb_dir) if log is not None and log.wandb_dir is not None else None,
            "wandb_url": log.wandb_url if log is not None else None,
            "config": cfg.to_dict(),
            # Library versions and the tokens' digest: what the numbers depend on beyond the config.
            "environment": self.environment,
            # strategy.every=auto: the period the bandwidth sustains, as the run worked it out.
            **({"strategy_every": self.trainer.strategy.cfg.every} if cfg.strategy.every == "auto" else {}),
        }

    def write_summary(self) -> None:
        if self.log is not None:
            self.log.summary(self.summary())


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block are noted and dropped: the run is already on its way out
    (writing its last state and summary), and a second signal must not leave them half-written."""
    with signals_to(lambda signum, frame: None):
        yield
