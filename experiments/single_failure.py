"""Validation loss around one mid-run failure: CheckFree vs copy / uniform / random / zero vs no failure.

Every run is the default job (``conf/config.yaml``, composed with Hydra exactly as ``python -m
checkfree.train`` composes it) with a one-event trace: stage ``--stage`` is lost at iteration ``--fail-at``
(F), and training goes on for ``--after`` more iterations. The no-failure run is ``strategy=none
failure=none``. Validation runs every ``--eval-every`` iterations (default 1, so F-1, F and F+after are
always evaluated). Until F every run is the same computation as the no-failure run (same seed, data and
init), so the "before" column is one number and the differences after it come from the recovery alone.

"Right after recovery" is measured, not approximated: the runs are the real run (``checkfree.train.build_run``)
with one extra validation right after the engine executes each recovery plan (before iteration F's optimizer
step); it reads no RNG and changes nothing, so the trajectory is the same as ``checkfree.train.train``'s. The iteration-F column
is the trainer's own record (recovery + one step).

    python experiments/single_failure.py [--seeds 1] [--fail-at 100] [--stage 3] \
        [--out results/single_failure]

Writes ``<out>/runs/<strategy>_seed<s>/`` (metrics.jsonl, summary.json, post_recovery.json),
``<out>/single_failure.json`` (every number) and ``<out>/single_failure.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from checkfree.engine import Outcome
from checkfree.run.runconfig import load_run_config
from checkfree.run.runlog import read_metrics
from checkfree.train import build_run

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("checkfree", "copy", "uniform", "random", "zero")
NO_FAILURE = "no failure"


class Probed:
    """A run's engine, plus one validation right after it executes each recovery plan."""

    def __init__(self, engine, val: torch.Tensor, batch_size: int, iteration) -> None:
        self.engine, self.val, self.batch_size, self.iteration = engine, val, batch_size, iteration
        self.post_recovery: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def execute(self, plan, progress: int) -> Outcome:
        outcome = self.engine.execute(plan, progress)
        loss = self.engine.evaluate(self.val, self.batch_size)
        self.post_recovery.append({"iteration": self.iteration(), "stages": list(plan.lost), "val_loss": loss})
        return outcome


def hydra_overrides(strategy: str, seed: int, trace: Path, args: argparse.Namespace) -> list[str]:
    common = [f"seed={seed}", f"trainer.iterations={args.fail_at + args.after}",
              f"trainer.eval_every={args.eval_every}", "trainer.progress_bar=false",
              "logger.wandb.mode=disabled"]
    if strategy == NO_FAILURE:
        return [*common, "strategy=none", "failure=none", *args.override]
    return [*common, f"strategy={strategy}", "failure=trace", f"failure.path={trace}", *args.override]


def run_one(strategy: str, seed: int, trace: Path, args: argparse.Namespace) -> dict:
    """One training run; returns its val-loss curve {iteration: loss} and the post-recovery probe."""
    cfg = compose(config_name="config", overrides=hydra_overrides(strategy, seed, trace, args))
    run_dir = args.out / "runs" / f"{strategy.replace(' ', '_')}_seed{seed}"
    run = build_run(load_run_config(cfg), run_dir)
    t = run.trainer
    t.engine = probed = Probed(t.engine, t.corpus.val, t.cfg.trainer.eval_batch_size, lambda: t.iteration_no)
    summary = run.run()
    probes = probed.post_recovery
    if probes:
        (run_dir / "post_recovery.json").write_text(json.dumps(probes, indent=2) + "\n")
    records = read_metrics(run_dir / "metrics.jsonl")
    curve = {r["iteration"]: r["val_loss"] for r in records if "val_loss" in r}
    return {"strategy": strategy, "seed": seed, "run_dir": str(run_dir), "curve": curve,
            "post_recovery": probes[0]["val_loss"] if probes else None,
            "recoveries": summary["recoveries"], "wall_s": summary["total_wall_time_s"]}


def iterations_back(curve: dict[int, float], fail_at: int) -> int | None:
    """Iterations after F until the val loss is back at (or below) its value just before the failure."""
    before = curve.get(fail_at - 1)
    for it in sorted(i for i in curve if i >= fail_at):
        if before is not None and curve[it] <= before:
            return it - fail_at
    return None


def summarise(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per strategy: the mean over seeds of each column (NaN-free: a missing value stays None)."""
    f, end = args.fail_at, args.fail_at + args.after
    baseline = {r["seed"]: r["curve"].get(end) for r in runs if r["strategy"] == NO_FAILURE and "curve" in r}
    rows = []
    for strategy in [*args.strategies, NO_FAILURE]:
        mine = [r for r in runs if r["strategy"] == strategy and "curve" in r]
        errors = [r["error"] for r in runs if r["strategy"] == strategy and "error" in r]

        def mean(values: list[float | None]) -> float | None:
            values = [v for v in values if v is not None]
            return statistics.fmean(values) if values else None

        backs = [iterations_back(r["curve"], f) for r in mine]
        rows.append({
            "strategy": strategy, "seeds": len(mine), "errors": errors,
            "before": mean([r["curve"].get(f - 1) for r in mine]),
            "post_recovery": mean([r["post_recovery"] for r in mine]),
            "at_f": mean([r["curve"].get(f) for r in mine]),
            "at_end": mean([r["curve"].get(end) for r in mine]),
            "delta": mean([r["curve"].get(end) - baseline[r["seed"]] for r in mine
                           if r["curve"].get(end) is not None and baseline.get(r["seed"]) is not None]),
            # Runs that never got back count as not back; the mean is over the runs that did.
            "back_after": mean(backs), "back_runs": sum(b is not None for b in backs),
        })
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, seeds: list[int]) -> str:
    f, end = args.fail_at, args.fail_at + args.after

    def fmt(x: float | None, signed: bool = False) -> str:
        return "—" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")

    lines = [
        f"Single failure: stage {args.stage} lost at iteration {f} of {end}; default config "
        f"(conf/config.yaml), seeds {seeds} (mean over seeds).",
        "",
        f"| strategy | val loss at {f - 1} (before) | right after recovery (before step {f}) "
        f"| at {f} (after step) | at {end} | vs no failure at {end} "
        "| iterations until back at the pre-failure loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["errors"] and not r["seeds"]:
            lines.append(f"| {r['strategy']} | error: {r['errors'][0]} | | | | | |")
            continue
        back = "—" if r["strategy"] == NO_FAILURE else (
            f"{r['back_after']:.1f}" if r["back_runs"] == r["seeds"] else
            f"{r['back_runs']}/{r['seeds']} runs" + (f" ({r['back_after']:.1f})" if r["back_runs"] else "")
            + f", others > {args.after}")
        post = "—" if r["strategy"] == NO_FAILURE else fmt(r["post_recovery"])
        lines.append(f"| {r['strategy']} | {fmt(r['before'])} | {post} | {fmt(r['at_f'])} "
                     f"| {fmt(r['at_end'])} | {fmt(r['delta'], signed=True)} | {back} |")
    lines += ["", "Lower is better. \"Right after recovery\" is an extra validation of the rebuilt model "
              f"before iteration {f}'s optimizer step; \"at {f}\" is after that step."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1,
                        help="number of seeds (0..N-1); the table shows the mean")
    parser.add_argument("--fail-at", type=int, default=100, help="iteration F at which the stage is lost")
    parser.add_argument("--after", type=int, default=20, help="iterations trained after the failure")
    parser.add_argument("--stage", type=int, default=3, help="the stage lost (intermediate: 1..S-2)")
    parser.add_argument("--eval-every", type=int, default=1, help="trainer.eval_every")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated recovery strategies")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "single_failure")
    parser.add_argument("--conf-dir", type=Path, default=REPO / "conf", help="Hydra config directory")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    # One thread by default: on a shared 2-core machine two OpenMP threads stall whenever another process
    # holds a core (a 0.2 s step then takes seconds). Results do not depend on it, only wall time.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    args.strategies = args.strategies.split(",")
    if args.fail_at < 2 or args.after < 1:
        parser.error("--fail-at must be >= 2 (so that iteration F-1 exists) and --after >= 1")
    if any(i % args.eval_every for i in (args.fail_at - 1, args.fail_at)):
        print(f"note: with --eval-every={args.eval_every} iterations F-1 and F may not be evaluated; "
              "those columns show — then", file=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"trace_stage{args.stage}_at{args.fail_at}.json"
    trace.write_text(json.dumps([{"iteration": args.fail_at, "stage": args.stage}]) + "\n")

    seeds = list(range(args.seeds))
    runs = []
    conf_dir = str(args.conf_dir.resolve())
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="single_failure"):
        for seed in seeds:
            for strategy in [NO_FAILURE, *args.strategies]:
                try:
                    run = run_one(strategy, seed, trace, args)
                except Exception as exc:  # one broken strategy must not lose the others' results
                    run = {"strategy": strategy, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                    print(f"seed {seed} {strategy}: FAILED {run['error']}", file=sys.stderr, flush=True)
                else:
                    curve, nan = run["curve"], float("nan")
                    print(f"seed {seed} {strategy}: val loss {curve.get(args.fail_at - 1, nan):.4f} at "
                          f"{args.fail_at - 1} -> {curve.get(args.fail_at + args.after, nan):.4f} at "
                          f"{args.fail_at + args.after} ({run['wall_s']:.0f} s)", flush=True)
                runs.append(run)

    # Up to F every run computes exactly what the no-failure run computes; a mismatch means something
    # other than the recovery differs between the runs, and the comparison would be unfair.
    for seed in seeds:
        befores = {r["strategy"]: r["curve"].get(args.fail_at - 1)
                   for r in runs if r["seed"] == seed and "curve" in r}
        if len(set(befores.values())) > 1:
            print(f"warning: seed {seed}: val losses at iteration {args.fail_at - 1} differ between runs: "
                  f"{befores}", file=sys.stderr)

    rows = summarise(runs, args)
    table = markdown(rows, args, seeds)
    (args.out / "single_failure.md").write_text(table)
    payload = {"fail_at": args.fail_at, "after": args.after, "stage": args.stage, "seeds": seeds,
               "overrides": args.override, "rows": rows, "runs": runs}
    (args.out / "single_failure.json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
