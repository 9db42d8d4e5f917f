"""No replacement node: hours to target against the mean replacement delay, waiting vs shrinking the pipeline.

Every result so far assumed a new node ~30 s after each loss. On spot and volunteer machines it may take
minutes, hours, or never come. This experiment asks what that costs CheckFree+, and whether running the lost
stage on a neighbour meanwhile (``engine.no_replacement=shrink``) beats stalling until the node comes
(``wait``):

* the regime of ``experiments/table2.py`` on ``--data`` (default pydocs, d=64, 6 stages, the paper clock at
  16 %/h, T and the target from that corpus' calibration), CheckFree+ (a loss no rule can rebuild — e.g. a
  merged host's two stages, swap partners — restarts them, as in Table 2's runs);
* a lost node's replacement arrives after an exponential delay (``failure.replacement=exponential``) with a mean
  of 30 s, 10 min, 1 h or 6 h, or never (only ``shrink`` can train on then), drawn per node from the failure
  seed, so wait and shrink meet the same delays after the same losses;
* ``shrink``: down to ``engine.min_hosts`` = 3 of 6 nodes (its default); a host running two stages is priced
  by the paper clock's rule (the measured iteration scaled by the bottleneck host's share of the compute), a
  stage moving back to its node by its weights + Adam state over the geo network's link;
* every run stops at the target, or after 4 T iterations, or after 4x the no-failure hours of simulated time
  (``trainer.sim_time_budget_s``) — a pipeline that mostly waits would otherwise train for days of CPU time to
  say what the budget already says.

Writes ``replacement.csv`` (one row per run), ``replacement.md`` (hours to target per policy and mean delay,
mean ± 95 % CI over seeds; shrink's paired speed-up over wait; where the time went) and ``replacement.png``
into ``--out``. Resumable: a finished run is not run again.

    python experiments/replacement.py [--data pydocs] [--out results/replacement] [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd  # noqa: E402
from table2 import CAP, RAN, calibrated_arguments, calibration_of, check_arguments, fmt, run_seconds, runs_of  # noqa: E402

from checkfree.reports.table2 import ci95  # noqa: E402
from checkfree.simulation import paper_table2  # noqa: E402
from checkfree.storage.archive import archived  # noqa: E402

DELAYS = (("30 s", 30 / 3600), ("10 min", 10 / 60), ("1 h", 1.0), ("6 h", 6.0), ("never", None))
"""(label, mean replacement delay in hours; None: no replacement ever arrives)."""
POLICIES = ("wait", "shrink")
STRATEGY, RATE = "checkfree_plus", 0.16


def points(seeds: int) -> list[tuple[str, int, list[str]]]:
    """Every (mean delay, policy, seed) — no ``wait`` for a node that never comes. Seed-major, so that a later
    invocation with more ``--seeds`` keeps the earlier seeds' run directories."""
    out = []
    for seed in range(seeds):
        for _, mean_h in DELAYS:
            for policy in POLICIES:
                if mean_h is None and policy == "wait":
                    continue
                arrival = ["failure.replacement=never"] if mean_h is None else \
                    ["failure.replacement=exponential", f"failure.replacement_mean_h={mean_h:.6g}"]
                out.append(("table2", len(out), [f"strategy={STRATEGY}", f"engine.no_replacement={policy}",
                                                 *arrival, f"seed={seed}"]))
    return out


def no_failure_hours() -> float:
    """The paper's CheckFree+ at 16 %/h without losses: 10,000 iterations at its measured time."""
    return paper_table2.PAPER_T * paper_table2.iteration_seconds("checkfree", RATE) / 3600  # its column


def regime(T: int, target: float, data: str | None) -> list[str]:
    return [*([f"data={data}"] if data else []), f"trainer.target_loss={target}", f"trainer.paper_T={T}",
            f"trainer.iterations={math.ceil(CAP * T)}", f"failure.hourly_rate={RATE}",
            f"trainer.sim_time_budget_s={CAP * no_failure_hours() * 3600:.0f}"]


def label(summary: dict) -> str:
    failure = summary["config"]["failure"]
    if failure["replacement"] == "never":
        return "never"
    return next(name for name, mean_h in DELAYS if mean_h is not None
                and math.isclose(mean_h, failure["replacement_mean_h"], rel_tol=1e-5))


def records(runs: list[dict], T: int) -> pd.DataFrame:
    rows = []
    for r in runs:
        if "config" not in r or r.get("status") not in ("completed", "error"):
            continue  # a run that never started (its failure is in its run directory), or one cut short
        hours = r.get("time_to_target_interp_s")
        rows.append({"delay": label(r), "policy": r["config"]["engine"]["no_replacement"], "seed": r["seed"],
                     "reached": hours is not None, "hours_to_target": hours / 3600 if hours is not None else None,
                     "iterations_over_T": r["iterations"] / T, "hours_run": r["total_sim_time_s"] / 3600,
                     "waiting_h": r.get("waiting_sim_s", 0) / 3600, "moving_h": r.get("moving_sim_s", 0) / 3600,
                     "shrunk_h": r.get("shrunk_sim_s", 0) / 3600, "min_live_hosts": r.get("min_live_hosts"),
                     "failures": r.get("n_failures"), "recovery_h": r.get("recovery_sim_s", 0) / 3600,
                     "status": r.get("status"), "error": r.get("error"), "wall_s": r.get("total_wall_time_s")})
    return pd.DataFrame(rows)


def ending(run) -> str:
    """How a run ended: at the target, out of nodes (``never``), out of simulated time, at the iteration cap."""
    if run.reached:
        return "target"
    if run.status == "error":
        return "out of nodes" if "NoHostsLeft" in str(run.error) else f"error: {run.error}"
    return "time budget" if run.hours_run >= CAP * no_failure_hours() else "iteration cap"


def paired(frame: pd.DataFrame, delay: str) -> list[float]:
    """Per seed, wait's hours over shrink's at ``delay`` (both reached the target; the same losses and delays)."""
    here = frame[(frame.delay == delay) & frame.reached]
    out = []
    for seed in sorted(set(here.seed)):
        mine = here[here.seed == seed].set_index("policy").hours_to_target
        if "wait" in mine and "shrink" in mine:
            out.append(float(mine["wait"]) / float(mine["shrink"]))
    return out


def report(frame: pd.DataFrame, T: int, target: float, out: Path, minutes: float | None, jobs: int) -> str:
    delays = [name for name, _ in DELAYS if name in set(frame.delay)]
    lines = ["| policy | " + " | ".join(f"mean delay {d}" for d in delays) + " |", "|---|" + "---|" * len(delays)]
    for policy in POLICIES:
        cells = []
        for d in delays:
            mine = frame[(frame.delay == d) & (frame.policy == policy)]
            hours = [h for h in mine.hours_to_target if h is not None and h == h]
            cells.append("—" if mine.empty else f"{fmt(hours, '.0f')} ({len(hours)}/{len(mine)})" if hours
                         else f"not reached (0/{len(mine)})")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    speed = [fmt(r, ".2f") if (r := paired(frame, d)) else "—" for d in delays]
    lines.append("| shrink's speed-up over wait | " + " | ".join(speed) + " |")
    where = ["", "| policy, mean delay | hours run | waiting h | shrunk h | moving h | fewest live nodes | "
             "failures | iterations / T | ended |", "|---|---|---|---|---|---|---|---|---|"]
    for policy in POLICIES:
        for d in delays:
            mine = frame[(frame.delay == d) & (frame.policy == policy)]
            if mine.empty:
                continue
            ended = ", ".join(sorted({ending(r) for r in mine.itertuples()}))
            where.append(f"| {policy}, {d} | {mine.hours_run.mean():.0f} | {mine.waiting_h.mean():.0f} | "
                         f"{mine.shrunk_h.mean():.0f} | {mine.moving_h.mean():.1f} | {int(mine.min_live_hosts.min())} | "
                         f"{mine.failures.mean():.0f} | {mine.iterations_over_T.mean():.2f} | {ended} |")
    text = "\n".join(lines + where) + (
        f"\n\nCheckFree+ at {RATE:.0%}/h, T = {T}, target {target}: paper hours to target (mean ± 95 % CI over "
        f"seeds; in brackets the runs that reached it within {CAP:g} T iterations and {CAP:g}x the no-failure "
        f"{no_failure_hours():.0f} h). Speed-up: per seed, wait's hours over shrink's (the same losses and "
        "replacement delays strike both). Second table: means over seeds of every run, reached or not. "
        + (f"Wall time of this invocation {minutes:.1f} min ({jobs} jobs); " if minutes is not None
           else "Written from the runs there (their wall time: wall_time.txt); ")
        + f"{frame.wall_s.fillna(0).sum() / 60:.1f} run-minutes in all.\n")
    (out / "replacement.md").write_text(text)
    return text


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = [name for name, _ in DELAYS]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for offset, policy in zip((-0.06, 0.06), POLICIES):
        xs, means, errors, missed = [], [], [], []
        for x, d in enumerate(delays):
            mine = frame[(frame.delay == d) & (frame.policy == policy)]
            hours = [h for h in mine.hours_to_target if h is not None and h == h]
            if hours:
                xs.append(x + offset)
                means.append(statistics.fmean(hours))
                errors.append(ci95(hours) if len(hours) > 1 else 0.0)
            elif not mine.empty:
                missed.append(x + offset)
        line = ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=policy)
        if missed:  # not reached within the budget: drawn at the budget, hollow
            ax.plot(missed, [CAP * no_failure_hours()] * len(missed), "o", mfc="none", color=line[0].get_color())
    ax.axhline(CAP * no_failure_hours(), color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(delays)), delays)
    ax.set_yscale("log")
    ax.set_xlabel("mean replacement delay")
    ax.set_ylabel("paper hours to target")
    seeds = frame.seed.nunique()
    ax.set_title(f"CheckFree+ at {RATE:.0%}/h without prompt replacements ({seeds} seed{'s' if seeds > 1 else ''};"
                 " hollow: not reached)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_arguments(parser, "replacement")
    args = parser.parse_args(argv)
    check_arguments(args)
    T, target = calibration_of(args)
    start, out = time.perf_counter(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with archived(out):  # its runs come from, and go back into, out/runs.parquet
        runs = runs_of(args, out, points(args.seeds), regime(T, target, args.data))
        frame = records(runs, T)
        frame.to_csv(out / "replacement.csv", index=False)
        minutes = None if args.report_only or not RAN else (time.perf_counter() - start) / 60
        text = report(frame, T, target, out, minutes, args.jobs)
        plot(frame, out / "replacement.png")
        print(text)
        print(f"{len(runs)} runs; {run_seconds(runs) / 60:.1f} run-minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
