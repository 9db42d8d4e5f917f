"""Soak: SIGKILL stage processes of the process engine at random moments, with a resumable save every iteration.

Each run is ``python -m checkfree.train engine=distributed trainer.save_every=1`` on the tests' tiny model
(4 stages, CheckFree+, losses it cannot rebuild re-initialised), and while it trains this script SIGKILLs a
random stage process every so often (``--gap`` seconds on average), so kills land in steps, commits,
validations, recoveries (cascades), and in the state saves. Half the kills are aimed at the save: they
follow right after a new metrics line, which the run writes just before it saves. A run ends by itself;
runs follow one another until ``--kills`` kills in all.

A crash is a run that does not exit 0 with a complete run directory (``checkfree.run.audit.check_run``: status
completed, one record per iteration, every lost stage matched by one recovery). The last line printed is
one JSON object: kills, runs, crashes, failures and recoveries (per command the loss interrupted), wall
time.

    python benchmarks/soak_kills.py [--kills 200] [--iterations 300] [--gap 1.5] [--seed 0]

One soak here (defaults, 2 shared cores): 200 kills over 5 runs of 300 iterations, 200 failures, 200
recoveries, 0 crashes, in 436 s; the kills interrupted 89 state saves (get_state), 105 steps, 5 commits and
1 rendezvous (a cascade).

Only processes the run's supervisor started are ever signalled (each PID from workers.json is checked to
be a live descendant of it), and every process this script starts is ended before it returns.
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
from collections import Counter
from pathlib import Path

import psutil

from checkfree.run.audit import AuditFailure, check_run
from checkfree.run.runlog import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def overrides(run_dir: Path, cache: Path, iterations: int, timeout_s: float, seed: int) -> list[str]:
    """The tests' tiny run (tests/test_reliability.py ``tiny_overrides``) on stage processes."""
    return ["model=tiny", "data.n_documents=600", "data.val_documents=60", "data.val_sequences=8",
            "data.vocab_size=300", f"data.cache_dir={cache}", "trainer.micro_batches=2",
            "trainer.micro_batch_size=4", "trainer.eval_every=10", "trainer.progress_bar=false",
            "logger.wandb.mode=disabled", "strategy=checkfree_plus", "strategy.unrecoverable=reinit",
            "failure=none", "engine=distributed", f"engine.timeout_s={timeout_s}", "trainer.save_every=1",
            f"trainer.iterations={iterations}", f"seed={seed}", f"hydra.run.dir={run_dir}"]


def lines(run_dir: Path) -> int:
    try:
        return len(read_metrics(run_dir / "metrics.jsonl"))
    except (FileNotFoundError, ValueError):
        return 0


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def stage_pids(run_dir: Path, supervisor: int) -> list[int]:
    """Live stage processes of this run: listed in workers.json and descendants of its supervisor."""
    try:
        listed = [w["pid"] for w in json.loads((run_dir / "workers.json").read_text())["workers"]]
        ours = {p.pid for p in psutil.Process(supervisor).children(recursive=True) if p.status() != "zombie"}
    except (FileNotFoundError, ValueError, psutil.Error):
        return []
    return [pid for pid in listed if pid in ours]


def soak_run(run_dir: Path, cache: Path, args: argparse.Namespace, rng: random.Random, budget: int) -> dict:
    """One run, killed up to ``budget`` times; its figures, or the reason it crashed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "checkfree.train",
               *overrides(run_dir, cache, args.iterations, args.timeout_s, args.seed)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    kills, aimed, started = 0, 0, time.monotonic()
    stderr = ""
    try:
        while proc.poll() is None and lines(run_dir) == 0:  # kills before training starts are start errors
            time.sleep(0.05)
        while proc.poll() is None and kills < budget:
            if rng.random() < 0.5:  # aimed at the save: right after the next metrics line
                seen = size(run_dir / "metrics.jsonl")
                while proc.poll() is None and size(run_dir / "metrics.jsonl") == seen:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.01))
                mode = "save"
            else:
                time.sleep(rng.uniform(0.0, 2 * args.gap))
                mode = "random"
            pids = stage_pids(run_dir, proc.pid)
            if proc.poll() is not None or not pids:
                continue
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills += 1
            aimed += mode == "save"
            time.sleep(rng.uniform(0.0, args.gap))  # some room for the recovery (a cascade now and then)
        _, stderr = proc.communicate(timeout=args.run_timeout_s)
    except subprocess.TimeoutExpired:
        stderr = f"no exit within {args.run_timeout_s:.0f} s"
    finally:
        stop(proc)
    out = {"run_dir": str(run_dir), "kills": kills, "aimed_at_save": aimed, "exit": proc.returncode,
           "wall_s": round(time.monotonic() - started, 1)}
    try:
        if proc.returncode != 0:
            raise AuditFailure(f"exit {proc.returncode}: {stderr.strip()[-800:]}")
        out.update(check_run(run_dir, args.iterations))
        summary = json.loads((run_dir / "summary.json").read_text())
        out["causes"] = dict(Counter(f.get("cause", "drawn") for f in summary["failures"]))
    except (AuditFailure, FileNotFoundError, ValueError) as exc:
        out["crash"] = str(exc)
    return out


def stop(proc: subprocess.Popen) -> None:
    """End the run and everything it started (its stage processes also die with it: PR_SET_PDEATHSIG)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for child in family:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="kills in all (runs follow until reached)")
    parser.add_argument("--per-run", type=int, default=60, help="kills per run at most")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--gap", type=float, default=1.5, help="mean seconds between random kills")
    parser.add_argument("--timeout-s", type=float, default=20.0, help="engine.timeout_s")
    parser.add_argument("--run-timeout-s", type=float, default=1200.0, help="a run that takes longer has hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    root = args.out or Path(tempfile.mkdtemp(prefix="soak_kills_"))
    cache = root / "cache"
    runs, started = [], time.monotonic()
    while sum(r["kills"] for r in runs) < args.kills:
        budget = min(args.per_run, args.kills - sum(r["kills"] for r in runs))
        run = soak_run(root / f"run{len(runs)}", cache, args, rng, budget)
        runs.append(run)
        print(json.dumps(run), flush=True)
        if run["kills"] == 0:
            break  # nothing could be killed: something else is wrong, say so below
    causes: Counter = Counter()
    for r in runs:
        causes.update(r.get("causes", {}))
    print(json.dumps({"kills": sum(r["kills"] for r in runs), "aimed_at_save": sum(r["aimed_at_save"] for r in runs),
                      "runs": len(runs), "crashes": sum("crash" in r for r in runs),
                      "failures": sum(r.get("failures", 0) for r in runs),
                      "recoveries": sum(r.get("recoveries", 0) for r in runs), "by_command": dict(causes),
                      "iterations": sum(r.get("iterations", 0) for r in runs),
                      "wall_s": round(time.monotonic() - started, 1), "run_dirs": str(root)}))


if __name__ == "__main__":
    main()
