"""Soak: every strategy on the default model for hundreds of iterations at a brutal failure rate.

Each strategy trains the default config (``cpu_small``, 6 stages) under per-iteration Bernoulli failures
with ``p`` per stage (default 0.05: about one lost stage every 3 iterations, several per stage, with
simultaneous and adjacent losses), on every stage including the edges. Strategies that cannot rebuild
some losses (plain CheckFree and its ablations at the edges; CheckFree+ when both swap partners go;
redundant when a stage and its shadow holder go together) run with ``strategy.unrecoverable=reinit``, so
those losses are re-initialised (and logged) rather than ending the run. Checkpointing saves every 10
steps, so its rollbacks land on real, recent checkpoints. The Bernoulli draws depend only on (seed,
iteration), so every strategy meets the same failures.

For every strategy it asserts: no crash, no hang (each run has a time limit), no non-finite training
loss, every metrics line parses, one record per iteration, and every lost stage matched by exactly one
recovery record (per iteration and stage, in metrics.jsonl and summary.json).

With ``--kills K`` each strategy also runs as ``python -m checkfree.train`` with ``trainer.save_every=1``,
is killed K times at random points (SIGKILL, SIGTERM or SIGINT, at a random moment of a random iteration)
and resumed each time with ``trainer.resume``; the killed-and-resumed run must end with exactly the metrics
(wall-clock fields aside) of the uninterrupted one.

    python benchmarks/soak.py [--iterations 300] [--strategies checkfree,checkpoint] [--p 0.05] [--kills 2]

Threads default to 1: on a small shared machine torch's intra-op threads fight over the cores and a
2-thread step can be 10x slower than a 1-thread one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from checkfree.recovery import STRATEGIES as REGISTERED
from checkfree.run.audit import AuditFailure, check_run, parse_metrics

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = [name for name in REGISTERED if name != "none"]
# What each strategy needs to survive every kind of loss (see the module docstring).
STRATEGY_OVERRIDES: dict[str, dict[str, Any]] = {
    "checkpoint": {"every": 10, "keep": 2},
    **{name: {"unrecoverable": "reinit"} for name in STRATEGIES if name != "checkpoint"},
}


def overrides(strategy: str, iterations: int, p: float, seed: int = 0) -> list[str]:
    """Hydra overrides of the default config for one soak run."""
    out = [f"strategy={strategy}", "failure=bernoulli", f"failure.p={p}", "failure.stages=all",
           f"trainer.iterations={iterations}", f"trainer.eval_every={max(1, iterations // 6)}",
           "trainer.progress_bar=false", "logger.wandb.mode=disabled", f"seed={seed}"]
    out += [f"strategy.{k}={v}" for k, v in STRATEGY_OVERRIDES[strategy].items()]
    return out


def compose(args: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from checkfree.run.runconfig import load_run_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return load_run_config(hydra_compose(config_name="config", overrides=args))


def soak_one(cfg, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` in this process into ``run_dir`` and check it."""
    from checkfree.train import train

    start = time.perf_counter()
    train(cfg, run_dir)
    return {**check_run(run_dir, cfg.trainer.iterations), "wall_s": time.perf_counter() - start}


def kill_and_resume(args: list[str], run_dir: Path, iterations: int, kills: int, rng: random.Random,
                    timeout_s: float) -> list[str]:
    """Run the CLI into ``run_dir``, killing it ``kills`` times at random points and resuming each time.
    Returns the signals sent. Raises AuditFailure on a hang, a torn metrics line or a wrong status."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}
    sent: list[str] = []
    command = [sys.executable, "-m", "checkfree.train", *args, "trainer.save_every=1", f"hydra.run.dir={run_dir}"]
    for attempt in range(kills + 1):
        resume = [f"trainer.resume={run_dir}"] if attempt else []
        proc = subprocess.Popen(command + resume, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        signalled = None
        try:
            if attempt < kills:
                # Spread the kills over the run: the k-th lands by iteration k/(kills+1) of the way, at the latest.
                done = _metrics_count(run_dir)
                latest = max(done + 1, iterations * (attempt + 1) // (kills + 1))
                target = rng.randint(done + 1, latest)
                deadline = time.monotonic() + timeout_s
                while _metrics_count(run_dir) < target and proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise AuditFailure(f"{run_dir}: no progress to iteration {target} in {timeout_s:.0f} s")
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next iteration (or between two)
                if proc.poll() is None:
                    signalled = rng.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
                    proc.send_signal(signalled)
                    sent.append(signalled.name)
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AuditFailure(f"{run_dir}: the process hung (no exit within {timeout_s:.0f} s)") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        parse_metrics(run_dir / "metrics.jsonl")  # every line written so far parses, killed or not
        status = json.loads((run_dir / "summary.json").read_text())["status"]
        if status == "completed":  # ran to the end (a signal may have come just after: nothing was lost)
            if signalled is None and proc.returncode != 0:
                raise AuditFailure(f"{run_dir}: exit {proc.returncode} after a completed run: {stderr[-500:]}")
            return sent
        if signalled is None:
            raise AuditFailure(f"{run_dir}: exit {proc.returncode} with status {status!r}: {stderr[-500:]}")
        expected = "running" if signalled == signal.SIGKILL else "interrupted"  # SIGKILL leaves no time to write
        if proc.returncode == 0 or status != expected:
            raise AuditFailure(f"{run_dir}: after {signalled.name} exit {proc.returncode}, status {status!r} "
                              f"(expected {expected!r}): {stderr[-500:]}")
    raise AuditFailure(f"{run_dir}: not completed after {kills} resumes")


def _metrics_count(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) - 1 if path.is_file() else -1  # the iteration-0 line aside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--p", type=float, default=0.05, help="per-stage per-iteration failure probability")
    parser.add_argument("--kills", type=int, default=2, help="kill-and-resume cycles per strategy (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run counts as hung")
    args = parser.parse_args()

    import torch

    from checkfree.run.runlog import deterministic_view

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; allowed: {', '.join(STRATEGIES)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="checkfree-soak-"))
    rng = random.Random(args.seed)
    rows, total_kills = [], 0
    print(f"soak: {len(strategies)} strategies x {args.iterations} iterations, bernoulli p={args.p} on every "
          f"stage, {args.kills} kill(s) each, threads={args.threads}, runs in {out}", flush=True)
    for strategy in strategies:
        run_args = overrides(strategy, args.iterations, args.p, args.seed)
        row = soak_one(compose(run_args), out / strategy)
        if args.kills:
            killed_dir = out / f"{strategy}-killed"
            row["kills"] = kill_and_resume(run_args, killed_dir, args.iterations, args.kills, rng, args.timeout)
            total_kills += len(row["kills"])
            check_run(killed_dir, args.iterations)
            a = deterministic_view(parse_metrics(out / strategy / "metrics.jsonl"))
            b = deterministic_view(parse_metrics(killed_dir / "metrics.jsonl"))
            if a != b:
                first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else None
                raise AuditFailure(f"{strategy}: the killed-and-resumed run differs from the uninterrupted one "
                                  f"(first at record {first})")
        rows.append(row)
        print(f"  {strategy}: {row['failures']} failures, {row['recoveries']} recoveries, "
              f"kills {row.get('kills', [])}, {row['wall_s']:.0f} s", flush=True)
    print()
    head = ["strategy", "iterations", "failures", "recoveries", "simultaneous", "adjacent", "per stage",
            "kills survived", "min loss", "max loss", "val loss (start -> end)", "wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['strategy']} | {r['iterations']} | {r['failures']} | {r['recoveries']} | {r['simultaneous']} | "
              f"{r['adjacent']} | {r['per_stage']} | {len(r.get('kills', []))} | {r['min_loss']:.3f} | "
              f"{r['max_loss']:.3f} | {r['initial_val_loss']:.3f} -> {r['final_val_loss']:.3f} | {r['wall_s']:.0f} |")
    print(f"\nall invariants held: {sum(r['iterations'] for r in rows)} iterations, "
          f"{sum(r['failures'] for r in rows)} failures, {sum(r['recoveries'] for r in rows)} recoveries, "
          f"{total_kills} kills survived (each resumed run identical to the uninterrupted one)")


if __name__ == "__main__":
    main()
