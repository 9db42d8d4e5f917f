"""The paper's Table 2, reproduced in its own units: hours to target per strategy and failure rate, with CIs.

Reads the run directories of ``experiments/table2.py`` (every run priced with ``trainer.clock=paper_table2``,
so simulated hours are paper hours) and writes, into ``--out``:

* ``comparison.csv`` — one row per (strategy, hourly rate): seeds, how many reached the target, hours to
  target (mean and 95 % CI half-width over seeds), iterations to target over T, stage failures met before
  the target, failures per stage per T, every strategy's speed-ups vs checkpointing and vs redundant
  computation (per-seed ratios: every strategy meets the same failure times at a seed), the same hours priced
  by our own cost model, and the paper's published numbers beside ours;
* ``comparison.md`` — the same as a Markdown table with the paper's values, and the validation loss's
  standard error; ``runs.csv`` — every run's own figures (hours, iterations and failures to target);
* ``val_loss_vs_hours.png`` — validation loss against paper hours, one panel per rate.

Times to target are interpolated between the two validations around the crossing (as the paper's plots
do). A run that never reached the target within its iteration cap counts as not reached; its hours are a
lower bound and it is left out of the mean (the ``reached`` column says how many did).

    python -m checkfree.reports.table2 results/table2/runs --out results/table2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from checkfree.analysis import find_run_dirs, load_runs, plot_val_loss
from checkfree.recovery import strategy_class
from checkfree.run.provenance import describe
from checkfree.run.rundir import reported_status
from checkfree.simulation import paper_table2

STRATEGIES = ("checkpoint", "redundant", "checkfree", "checkfree_plus", "async_checkpoint", "memory_checkpoint",
              "snapshot_restore")
"""The table's rows, in this order: the paper's four, then the modern checkpointing baselines (which the paper
did not run: their paper columns stay empty)."""
COLUMNS = ["strategy", "hourly_rate", "seeds", "reached", "hours_to_target", "hours_ci95",
           "iterations_to_target_over_T", "iterations_ci95", "failures_before_target",
           "failures_per_stage_per_T", "speedup_vs_checkpoint", "speedup_vs_checkpoint_ci95",
           "speedup_vs_redundant", "speedup_vs_redundant_ci95", "cost_model_hours_to_target",
           "paper_hours_to_target", "paper_iterations_over_T", "paper_speedup_vs_checkpoint",
           "paper_speedup_vs_redundant", "time_over_T", "time_ci95", "lost_iterations",
           "memory_overhead_mb_per_node"]

# Two-sided 95 % Student t quantiles by degrees of freedom (n - 1); a CI over n seeds is mean +- t * s / sqrt(n).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95 % confidence interval of the mean (NaN with fewer than two values)."""
    if len(values) < 2:
        return math.nan
    return T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def load(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run: the summary fields this table needs."""
    rows = []
    for run_dir in find_run_dirs(paths):
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        cfg = s.get("config") or {}
        t = (cfg.get("trainer") or {}).get("paper_T")
        ttt = s.get("time_to_target_interp_s")
        failures = s.get("failures") or []
        rows.append({
            # "running" only while a process holds the run; a killed one's summary reads "killed".
            "run_dir": str(run_dir), "strategy": s["strategy"], "seed": s["seed"],
            "status": reported_status(run_dir, s["status"]),
            "hourly_rate": 0.0 if s["failure"] == "none" else s["hourly_rate"], "T": t,
            "n_stages": (cfg.get("model") or {}).get("n_stages"), "iterations": s["iterations"],
            "reached": ttt is not None, "hours": ttt / 3600 if ttt is not None else s["total_sim_time_s"] / 3600,
            "iterations_to_target": s.get("iterations_to_target_interp"),
            "failures_before_target": sum(1 for f in failures if ttt is None or f["time_s"] <= ttt),
            "n_failures": len(failures), "n_recoveries": s["n_recoveries"],
            "recoveries_by_method": s.get("recoveries_by_method"), "final_val_loss_se": s.get("final_val_loss_se"),
            "val_sequences": s.get("val_sequences"), "target": s.get("target_loss"),
            "lost_iterations": s.get("lost_iterations", 0),
            # The busiest node's extra memory (held copies, snapshots), as the summary reports it per node.
            "memory_overhead_mb_per_node": max(s.get("memory_overhead_bytes_per_node") or [0]) / 1e6,
            "environment": s.get("environment"),  # library versions and the tokens' digest (checkfree.run.provenance)
        })
    return pd.DataFrame(rows)


def cost_model_seconds(strategy: str) -> float:
    """Our own cost model's price of one paper-scale iteration (llama_500m, 4 x 16 sequences, the 7-site
    geo-distributed network) for ``strategy``: the second pricing, beside the paper's measured one."""
    from checkfree.model.presets import preset
    from checkfree.simulation.cost import CostModel
    from checkfree.simulation.networks import NetworkConfig

    network = NetworkConfig(name="geo_distributed")
    cost = CostModel(preset("llama_500m"), 4, 16, network, replicas=4)
    cls = strategy_class(strategy)
    return cost.iteration_seconds(cls.schedule_name, shadows=cls.redundant_compute)


def paper_iteration_seconds(strategy: str, i: int) -> float:
    """The paper's measured seconds per iteration of ``strategy`` at ``paper_table2.RATES[i]`` (its Table 2 column)."""
    return paper_table2.ITERATION_S[strategy_class(strategy).table2_column][i]


def paper_value(column: dict[str, tuple[float, ...]], strategy: str, i: int) -> float:
    """The paper's Table 2 figure of ``strategy`` at ``paper_table2.RATES[i]`` from one of its columns; NaN
    where the paper has none (it ran four strategies, and compared only some of them)."""
    return column.get(strategy, (math.nan,) * len(paper_table2.RATES))[i]


def paired_speedups(runs: pd.DataFrame, base: str, strategy: str, rate: float) -> list[float]:
    """Per seed: hours of ``base`` / hours of ``strategy`` (the same failure times strike both at a seed)."""
    a = runs[(runs.strategy == base) & (runs.hourly_rate == rate) & runs.reached].set_index("seed")["hours"]
    b = runs[(runs.strategy == strategy) & (runs.hourly_rate == rate) & runs.reached].set_index("seed")["hours"]
    return [a[s] / b[s] for s in sorted(set(a.index) & set(b.index))]


def comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, rate) of the runs there are; a run still under way is not a seed's result yet and
    is left out (a report written mid-sweep says how many: ``markdown``)."""
    rows, runs = [], runs[runs.status != "running"]
    for strategy in STRATEGIES:
        for i, rate in enumerate(paper_table2.RATES):
            mine = runs[(runs.strategy == strategy) & (runs.hourly_rate == rate)]
            if mine.empty:
                continue
            reached = mine[mine.reached]
            T = float(mine["T"].iloc[0])
            hours = list(reached["hours"])
            its = [x / T for x in reached["iterations_to_target"]]
            # The paper's "iterations / T" is its hours to target over the no-failure time (10,000 iterations at
            # the strategy's price): the same ratio of ours counts lost work and recoveries, which CPU
            # iterations / T do not.
            times = [h * 3600 / (paper_iteration_seconds(strategy, i) * paper_table2.PAPER_T) for h in hours]
            vs_ckpt = paired_speedups(runs, "checkpoint", strategy, rate) if strategy != "checkpoint" else []
            vs_red = paired_speedups(runs, "redundant", strategy, rate) if strategy != "redundant" else []
            per_T = [r.n_failures / r.n_stages / (r.iterations / T) for r in mine.itertuples() if r.iterations]
            paper_hours = paper_value(paper_table2.HOURS, strategy, i)
            rows.append({
                "strategy": strategy, "hourly_rate": rate, "seeds": len(mine), "reached": len(reached),
                "hours_to_target": statistics.fmean(hours) if hours else math.nan, "hours_ci95": ci95(hours),
                "iterations_to_target_over_T": statistics.fmean(its) if its else math.nan,
                "iterations_ci95": ci95(its),
                "failures_before_target": statistics.fmean(reached["failures_before_target"]) if hours else math.nan,
                "failures_per_stage_per_T": statistics.fmean(per_T) if per_T else math.nan,
                "speedup_vs_checkpoint": statistics.fmean(vs_ckpt) if vs_ckpt else math.nan,
                "speedup_vs_checkpoint_ci95": ci95(vs_ckpt),
                "speedup_vs_redundant": statistics.fmean(vs_red) if vs_red else math.nan,
                "speedup_vs_redundant_ci95": ci95(vs_red),
                # The same iterations to target, each priced by our cost model (in paper iterations).
                "cost_model_hours_to_target": (statistics.fmean(its) * paper_table2.PAPER_T * cost_model_seconds(strategy) / 3600
                                               if its else math.nan),
                "paper_hours_to_target": paper_hours,
                "paper_iterations_over_T": paper_hours * 3600 / paper_iteration_seconds(strategy, i) / paper_table2.PAPER_T,
                "paper_speedup_vs_checkpoint": paper_value(paper_table2.SPEEDUP_VS_CHECKPOINT, strategy, i),
                "paper_speedup_vs_redundant": paper_value(paper_table2.SPEEDUP_VS_REDUNDANT, strategy, i),
                "time_over_T": statistics.fmean(times) if times else math.nan, "time_ci95": ci95(times),
                "lost_iterations": statistics.fmean(mine["lost_iterations"]),
                "memory_overhead_mb_per_node": statistics.fmean(mine["memory_overhead_mb_per_node"]),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def _pm(mean: float, half: float, fmt: str = ".3g") -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{fmt}}" + (f" ± {half:{fmt}}" if math.isfinite(half) else "")


def markdown(table: pd.DataFrame, runs: pd.DataFrame, calibration: dict[str, Any] | None) -> str:
    lines = []
    # Every run and the calibration in one environment, or a warning that says which runs were not.
    # (A run that failed before it trained has no environment to tell: it is left out.)
    lines += [describe(list(runs.loc[runs["iterations"] > 0, "environment"]),
                       (calibration or {}).get("environments", [])), ""]
    if calibration:
        lines += [f"Calibration (no failures, {len(calibration['iterations'])} seeds): T = {calibration['T']} "
                  f"iterations to validation loss {calibration['target']} (per seed: "
                  f"{', '.join(f'{x:.0f}' for x in calibration['iterations'])}); every CPU iteration stands for "
                  f"{paper_table2.PAPER_T / calibration['T']:.2f} paper iterations.", ""]
    se = runs["final_val_loss_se"].dropna()
    if len(se):
        lines += [f"Validation set: {int(runs['val_sequences'].dropna().iloc[0])} sequences; standard error of the "
                  f"validation loss (per-sequence losses) {se.median():.4f} (median over runs, "
                  f"range {se.min():.4f}-{se.max():.4f}).", ""]
    running = int((runs.status == "running").sum())
    if running:
        lines += [f"{running} run(s) still running, left out of the table below.", ""]
    lines += ["| strategy | rate | reached | hours to target (ours) | paper | time to target / T (ours) | paper "
              "| CPU iterations / T (ours) | failures before target | failures / stage / T "
              "| speed-up vs ckpt (ours) | paper | vs redundant (ours) | paper | hours, our cost model "
              "| lost iterations | memory overhead / node (MB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(
            f"| {r.strategy} | {r.hourly_rate:.0%} | {r.reached}/{r.seeds} | {_pm(r.hours_to_target, r.hours_ci95, '.0f')} "
            f"| {_pm(r.paper_hours_to_target, math.nan, '.0f')} | {_pm(r.time_over_T, r.time_ci95, '.2f')} "
            f"| {_pm(r.paper_iterations_over_T, math.nan, '.2f')} "
            f"| {_pm(r.iterations_to_target_over_T, r.iterations_ci95, '.2f')} "
            f"| {r.failures_before_target:.0f} | {r.failures_per_stage_per_T:.1f} "
            f"| {_pm(r.speedup_vs_checkpoint, r.speedup_vs_checkpoint_ci95, '.2f')} "
            f"| {_pm(r.paper_speedup_vs_checkpoint, math.nan, '.2f')} "
            f"| {_pm(r.speedup_vs_redundant, r.speedup_vs_redundant_ci95, '.2f')} "
            f"| {_pm(r.paper_speedup_vs_redundant, math.nan, '.2f')} | {_pm(r.cost_model_hours_to_target, math.nan, '.0f')} "
            f"| {r.lost_iterations:.0f} | {r.memory_overhead_mb_per_node:.2f} |")
    lines += ["", "Time to target / T: hours to target over the no-failure time (T iterations at the strategy's "
              "paper price), as the paper's 'iterations / T' column; CPU iterations / T leaves out the work that "
              "losses threw away and the recoveries.", "Mean ± 95 % CI over seeds (Student t). Speed-ups are per-seed ratios of hours to target (the same "
              "failure times strike every strategy at a seed). Runs that did not reach the target within their "
              "iteration cap are left out of the means (see 'reached')."]
    return "\n".join(lines) + "\n"


def relative_to(run_dir: str | Path, out: Path) -> str:
    """``run_dir`` as a path relative to ``out`` where it lies under it (else as given)."""
    try:
        return Path(run_dir).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(run_dir)


def write_report(paths: Sequence[str | Path], out: str | Path, calibration: dict[str, Any] | None = None) -> pd.DataFrame:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load(paths)
    if runs.empty:
        raise SystemExit(f"no run summaries under {', '.join(map(str, paths))}: nothing to report")
    table = comparison(runs[runs.strategy != "none"])
    table.to_csv(out / "comparison.csv", index=False, float_format="%.6g")
    # Every run's own figures, so the table can be checked (and re-derived) without the run directories.
    # Run directories relative to ``out``: the file must not depend on which clone made it.
    runs = runs.assign(run_dir=[relative_to(d, out) for d in runs.run_dir])
    runs.drop(columns=["recoveries_by_method", "environment"]).sort_values(["strategy", "hourly_rate", "seed"]).to_csv(
        out / "runs.csv", index=False, float_format="%.6g")
    text = markdown(table, runs, calibration)
    if text.startswith("Warning:"):
        print(text.splitlines()[0], file=sys.stderr)
    (out / "comparison.md").write_text(text)
    df = load_runs(paths)
    target = calibration["target"] if calibration else None
    plot_val_loss(df[df.strategy.isin(STRATEGIES)], out / "val_loss_vs_hours.png", target)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--calibration", default=None, help="calibration.json written by experiments/table2.py")
    args = parser.parse_args(argv)
    calibration = json.loads(Path(args.calibration).read_text()) if args.calibration else None
    print(markdown(write_report(args.paths, args.out, calibration), load(args.paths), calibration))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
