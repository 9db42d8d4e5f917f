"""Hydra entry point: ``python -m checkfree.train [overrides]`` (multirun with ``-m``).

Config flows one way: Hydra composes ``conf/`` -> ``load_run_config`` validates everything into
dataclasses before any work starts -> ``Trainer`` builds each part once and runs. The run directory is
Hydra's output directory (``hydra.run.dir``); it receives ``metrics.jsonl`` and ``summary.json``.

A bad config exits with status 2 and one sentence; a failing run still leaves its files and exits 1.
In a multirun sweep a failing point is logged and the sweep goes on to the next point.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from checkfree.config import ConfigError
from checkfree.runconfig import load_run_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _raise_interrupted(signum: int, frame: object) -> None:
    from checkfree.trainer import Interrupted

    raise Interrupted(f"signal {signum}")


def run_job(cfg: DictConfig) -> dict | None:
    """One Hydra job. Returns the summary, or None when the job failed inside a multirun."""
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run = load_run_config(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        if multirun:
            (run_dir / "config_error.txt").write_text(f"{exc}\n")
            return None
        sys.exit(2)

    signal.signal(signal.SIGTERM, _raise_interrupted)
    if run.engine.name == "distributed":
        from checkfree.distributed import train as distributed_train

        runner = distributed_train
    else:
        from checkfree.trainer import train as runner
    try:
        summary = runner(run, run_dir)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {run_dir}", file=sys.stderr)
        raise
    except Exception as exc:
        print(f"run failed: {type(exc).__name__}: {exc}\nresults so far in {run_dir}", file=sys.stderr)
        if multirun:
            return None  # one bad sweep point never stops the others
        sys.exit(1)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict) -> None:
    print(f"\n{summary['strategy']} | {summary['iterations']} iterations | "
          f"val loss {summary['initial_val_loss']:.3f} -> {summary['final_val_loss']:.3f} | "
          f"simulated {summary['total_sim_time_s'] / 3600:.2f} h")
    print(f"failures: {summary['n_failures']}, recoveries: {summary['n_recoveries']} "
          f"{summary['recoveries_by_method']}, lost iterations: {summary['lost_iterations']}")
    for failure, recovery in zip(summary["failures"], summary["recoveries"]):
        print(f"  iteration {failure['iteration']:>4}: stage {failure['stage']} lost -> "
              f"{recovery['method']} from {recovery['sources'] or 'nothing'}")
    if summary.get("time_to_target_s") is not None:
        print(f"target {summary['target_loss']} reached at {summary['time_to_target_s'] / 3600:.2f} simulated h")
    print(f"run directory: {summary['run_dir']}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    main()
