"""Recovery under real spot-preemption traces: R nodes a stage, Bamboo's AWS pools, and the i.i.d. control.

Every result before this drew independent Poisson losses of whole stages at the paper's 5-16 %/h. Real spot pools
lose a node about every two node-hours, in bursts, and deployed systems keep several nodes a stage, so that a
stage is lost only when all of them go. This experiment runs Table 2's regime (``--data``'s calibration: T and
target, the paper's clock, recoveries of ~30 s, runs stopped at the target or 4 T) with

* nodes: ``engine.replicas`` R in {1, 2} (``checkfree.simulation.roster``: a lost node whose stage has a live one is
  not a stage loss; the survivors carry its work and its replacement copies the stage's state);
* failures: Bamboo's p3 and g4dn traces as a pool of nodes (``failure=churn``: a vacancy waits for a spare or
  the next node the trace brings), and as the control, independent Poisson node losses
  (``failure.unit=node``) at each trace's own measured rate per running node-hour, with a replacement 30 s after
  each loss (what the i.i.d. model of every earlier table assumes);
* recoveries: ``checkfree``, ``checkfree_plus``, ``snapshot_restore``, ``checkpoint``.

It reports hours to target / T (mean ± 95 % CI over the seeds that reached the target within 4 T), stage losses
per T (in paper hours), and each strategy's speed-up over checkpointing at the same seed, into ``traces.csv``,
``traces.md`` and ``traces.png`` under ``--out``; resumable, runs packed into ``runs.parquet``.

    python experiments/traces.py [--data pydocs] [--size 8] [--out results/traces] [--seeds 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd  # noqa: E402
from table2 import (  # noqa: E402
    CAP,
    RAN,
    ROOT,
    calibrated_arguments,
    calibration_file,
    calibration_of,
    check_arguments,
    fmt,
    refuse,
    regime,
    run_groups,
    run_seconds,
    size_overrides,
)

from checkfree.failure_models.base import FailureConfig, Nodes  # noqa: E402
from checkfree.failure_models.churn import ChurnFailures  # noqa: E402
from checkfree.failure_models.churn_files import read_pool_trace  # noqa: E402
from checkfree.reports.table2 import T95, paper_iteration_seconds  # noqa: E402
from checkfree.run.config import ConfigError  # noqa: E402
from checkfree.run.provenance import describe  # noqa: E402
from checkfree.simulation import paper_table2  # noqa: E402
from checkfree.storage.archive import archived  # noqa: E402


@dataclass(frozen=True)
class Trace:
    """A pool trace the experiment replays: its name in the tables, its file and its format (``churn_files``)."""

    name: str
    path: Path
    format: str = "bamboo"


TRACES = (Trace("p3", ROOT / "conf/failure/traces/bamboo/p3-trace.csv"),
          Trace("g4dn", ROOT / "conf/failure/traces/bamboo/g4dn-trace.csv"))
"""Bamboo's AWS spot pools, as published (conf/failure/traces/bamboo/README.md): the default ``--traces``."""
STRATEGIES = ("checkfree", "checkfree_plus", "snapshot_restore", "checkpoint")
REPLICAS = (1, 2)
N_STAGES = 6
"""The Table 2 regime's model (conf/model/cpu_sweep.yaml): 6 stages."""
RATE_HOURS = 2000.0
RATE_SEEDS = 3
"""Each trace's loss rate per running node-hour is measured over ``RATE_HOURS`` simulated hours of replay at
each of ``RATE_SEEDS`` seeds (fixed: the control's rate, and so its runs, must not depend on ``--seeds``)."""
PAPER_RATE = 0.16
"""The paper clock's iteration times are its 16 %/h column's (the highest rate it measured)."""


def sources_of(traces: tuple[Trace, ...]) -> tuple[str, ...]:
    """Every trace, then every trace's i.i.d. control (``<name>_iid``): the order of the grid."""
    return (*(t.name for t in traces), *(f"{t.name}_iid" for t in traces))


def measured_rate(trace: Trace, replicas: int) -> float:
    """Losses per running node-hour of ``trace`` on ``N_STAGES x replicas`` slots: the pool replayed for
    ``RATE_HOURS`` simulated hours at each of ``RATE_SEEDS`` seeds' failure streams (seed + 1000, the default seed
    offset); a slot with no node (waiting for one) runs no node-hours."""
    changes = read_pool_trace(trace.path, trace.format)
    losses, running = 0, 0.0
    horizon = RATE_HOURS * 3600
    for seed in range(RATE_SEEDS):
        model = ChurnFailures(changes, N_STAGES, replicas, seed + 1000)
        events = model.events(1, 0.0, horizon)
        vacant = sum(min(model.filled_at(e.replica * N_STAGES + e.stage, e.time_s), horizon) - e.time_s
                     for e in events)
        losses += len(events)
        running += N_STAGES * replicas * horizon - vacant
    return losses / (running / 3600)


def points(traces: tuple[Trace, ...], sources: list[str], strategies: list[str], seeds: int,
           rates: dict[tuple[str, int], float], replicas_run: tuple[int, ...] = REPLICAS) -> list[tuple[list, list]]:
    """Groups of (points, extra overrides): one group per failure source (a trace's path stays out of the run
    directory's name). Every point keeps its place in the whole grid (seed-major, then source, R, strategy),
    so that an invocation with fewer ``--sources`` or ``--strategies``, or more ``--seeds``, finds the
    directories of the points it shares with any other."""
    groups: dict[str, list] = {s: [] for s in sources}
    by_name = {t.name: t for t in traces}
    index = 0
    for seed in range(seeds):
        for source in sources_of(traces):
            trace = by_name[source.removesuffix("_iid")]
            for replicas in REPLICAS:
                for strategy in STRATEGIES:
                    if source in sources and strategy in strategies and replicas in replicas_run:
                        if source.endswith("_iid"):
                            # Poisson per node at the trace's rate: the probability of a loss within an hour.
                            h = 1 - math.exp(-rates[(trace.name, replicas)])
                            failure = ["failure.unit=node", f"failure.hourly_rate={h:.6f}"]
                        else:
                            failure = ["failure=churn", "failure.name=churn", f"failure.format={trace.format}"]
                        groups[source].append(("table2", index, [*failure, f"engine.replicas={replicas}",
                                                                  f"strategy={strategy}", f"seed={seed}"]))
                    index += 1
    # The paper clock reads its iteration time from the Table 2 column nearest failure.hourly_rate: 16 %/h, the
    # highest it measured, for every source (a churn run's rate is unused by its model; a control's is above it).
    return [(groups[s], [f"failure.path={by_name[s].path}", f"failure.hourly_rate={PAPER_RATE}"]
             if not s.endswith("_iid") else []) for s in sources]


def source_of(summary: dict, traces: tuple[Trace, ...], rates: dict[tuple[str, int], float]) -> str:
    """The trace a run replayed, or ``<trace>_iid`` for the control at that trace's rate."""
    failure = summary["config"]["failure"]
    if failure["name"] == "churn":
        return next((t.name for t in traces if t.path.name == Path(failure["path"]).name),
                    Path(failure["path"]).stem)
    replicas = summary["config"]["engine"]["replicas"]
    for (trace, r), rate in rates.items():
        if r == replicas and f"{1 - math.exp(-rate):.6f}" == f"{failure['hourly_rate']:.6f}":
            return f"{trace}_iid"
    return f"poisson {failure['hourly_rate']}"


def records(runs: list[dict], traces: tuple[Trace, ...], rates: dict[tuple[str, int], float]) -> pd.DataFrame:
    rows = []
    for r in runs:
        if "config" not in r or r.get("status") == "running":
            continue
        seconds = r.get("time_to_target_interp_s")
        hours = r["total_sim_time_s"] / 3600
        rows.append({"source": source_of(r, traces, rates), "replicas": r["config"]["engine"]["replicas"],
                     "strategy": r["strategy"], "seed": r["seed"], "reached": seconds is not None,
                     "hours_to_target": seconds / 3600 if seconds is not None else None, "hours_run": hours,
                     "node_losses": r.get("node_losses"), "stage_losses": r.get("stage_losses"),
                     "adjacent_stage_losses": r.get("adjacent_stage_losses"), "resyncs": r.get("resyncs"),
                     "under_replicated_h": r.get("under_replicated_sim_s", 0.0) / 3600,
                     "waiting_h": r.get("waiting_sim_s", 0.0) / 3600, "spares_used": r.get("spares_used"),
                     "vacancies_waited": r.get("vacancies_waited"), "trace_passes": r.get("trace_passes"),
                     "lost_iterations": r.get("lost_iterations"), "status": r.get("status"),
                     "wall_s": r.get("total_wall_time_s")})
    return pd.DataFrame(rows)


def no_failure_hours(strategy: str) -> float:
    """The denominator of time to target / T: 10,000 paper iterations at the strategy's own no-failure time."""
    return paper_iteration_seconds(strategy, paper_table2.RATES.index(PAPER_RATE)) * paper_table2.PAPER_T / 3600


def report(frame: pd.DataFrame, T: int, target: float, rates: dict, out: Path, minutes: float | None, jobs: int,
           environment: str = "") -> str:
    lines = ["| failures | R | recovery | time to target / T | stage losses / T | adjacent pairs / T | "
             "node losses / T | waiting for nodes (h) | speed-up over checkpointing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for source in dict.fromkeys(frame.source):
        for replicas in REPLICAS:
            here = frame[(frame.source == source) & (frame.replicas == replicas)]
            if here.empty:
                continue
            base = here[here.strategy == "checkpoint"].set_index("seed")
            for strategy in STRATEGIES:
                mine = here[here.strategy == strategy]
                if mine.empty:
                    continue
                reached = mine[mine.reached]
                norm = no_failure_hours(strategy)
                over_t = [h / norm for h in reached.hours_to_target]
                per_t = [row.hours_run / norm for row in mine.itertuples()]  # run length in T
                cell = (fmt(over_t, ".2f") + (f" ({len(reached)}/{len(mine)})" if len(reached) < len(mine) else "")
                        if over_t else f"— (0/{len(mine)})")
                speed = [base.loc[row.seed, "hours_to_target"] / row.hours_to_target for row in reached.itertuples()
                         if row.seed in base.index and base.loc[row.seed, "reached"]]
                lines.append(
                    f"| {source} | {replicas} | {strategy} | {cell} | {per_run(mine.stage_losses, per_t):.1f} | "
                    f"{per_run(mine.adjacent_stage_losses, per_t):.2f} | {per_run(mine.node_losses, per_t):.1f} | "
                    f"{mine.waiting_h.mean():.1f} | "
                    f"{fmt(speed, '.2f') if strategy != 'checkpoint' and speed else '—'} |")
    measured = ", ".join(f"{t} R={r}: {v:.3f}" for (t, r), v in sorted(rates.items()))
    text = "\n".join(lines) + "\n\n" + (
        f"Table 2's regime on its calibration (T = {T}, target {target}), the paper's clock at its 16 %/h times, "
        f"{N_STAGES} stages x R nodes; runs stopped at the target or {CAP:g} T. Time to target / T: paper hours over "
        "the strategy's no-failure time, mean ± 95 % CI over the seeds that reached the target (in brackets where "
        "not all did). Losses per T: over each run's length in T. Speed-up: checkpointing's hours over the "
        "strategy's, per seed where both reached the target. Failures: Bamboo's AWS pool traces replayed as a pool "
        "(failure=churn), and the i.i.d. control at each trace's measured rate per running node-hour (replayed "
        f"{RATE_HOURS:g} h at each of {RATE_SEEDS} seeds, losses per running node-hour: {measured}). "
        + (f"Wall time of this invocation {minutes:.1f} min ({jobs} jobs); " if minutes is not None
           else "Written from the runs there; ")
        + f"{frame.wall_s.fillna(0).sum() / 60:.1f} run-minutes in all.\n" + (f"\n{environment}\n" if environment else ""))
    (out / "traces.md").write_text(text)
    return text


def per_run(counts, lengths: list[float]) -> float:
    """A count per T of run, averaged over the runs (a run that stopped before any time passed: left out; a
    count missing from a run that died: 0)."""
    values = [(c if c == c and c is not None else 0) / t for c, t in zip(counts, lengths) if t > 0]
    return statistics.fmean(values) if values else float("nan")


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(frame.source))
    fig, axes = plt.subplots(1, len(REPLICAS), figsize=(6 * len(REPLICAS), 4), squeeze=False, sharey=True)
    width = 0.8 / len(STRATEGIES)
    for ax, replicas in zip(axes[0], REPLICAS):
        for j, strategy in enumerate(STRATEGIES):
            means, errors = [], []
            for i, source in enumerate(sources):
                ran = frame[(frame.source == source) & (frame.replicas == replicas) & (frame.strategy == strategy)]
                mine = ran[ran.reached]
                if len(ran) and mine.empty:  # run, and the target not reached within the cap: a cross at it
                    ax.scatter([i + j * width], [CAP], marker="x", color=f"C{j}")
                values = [h / no_failure_hours(strategy) for h in mine.hours_to_target]
                means.append(statistics.fmean(values) if values else float("nan"))
                errors.append(T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
                              if len(values) > 1 else 0.0)
                if values and len(values) < len(ran):  # a mean of the seeds that got there: say how many did
                    ax.annotate(f"{len(values)}/{len(ran)}", (i + j * width, means[-1]), fontsize=6, ha="center",
                                xytext=(0, 2), textcoords="offset points")
            ax.bar([i + j * width for i in range(len(sources))], means, width, yerr=errors, label=strategy)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sources))], sources, fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_title(f"R = {replicas} node(s) a stage (x: not within {CAP:g} T; k/n: k of n seeds reached it)",
                     fontsize=9)
        ax.set_ylabel("paper hours to target / T")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_traces(text: str) -> tuple[Trace, ...]:
    """``--traces``: NAME=PATH[@FORMAT], comma-separated, each a pool that fills the run's largest number of node
    slots (``N_STAGES`` x the largest R); a bad one is refused in one sentence before any work."""
    traces = []
    for item in text.split(","):
        name, _, rest = item.partition("=")
        path, _, fmt = rest.partition("@")
        fmt = fmt or "bamboo"
        if not name.isidentifier() or name.endswith("_iid") or not path:
            refuse("--traces", item, "NAME=PATH[@FORMAT] with NAME a word not ending in _iid")
        trace = Trace(name, (ROOT / path).resolve() if not Path(path).is_absolute() else Path(path), fmt)
        try:
            ChurnFailures.check(FailureConfig(name="churn", path=str(trace.path), format=fmt), N_STAGES,
                                list(range(N_STAGES)), None, Nodes(max(REPLICAS)))
        except ConfigError as e:
            refuse("--traces", item, f"its trace cannot be replayed here ({e})")
        traces.append(trace)
    if len({t.name for t in traces}) != len(traces) or len({t.path.name for t in traces}) != len(traces):
        refuse("--traces", text, "each name and each file name once (a run is told apart by its trace's file name)")
    return tuple(traces)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_arguments(parser, "traces")
    parser.add_argument("--traces", default=",".join(f"{t.name}={t.path.relative_to(ROOT)}@{t.format}" for t in TRACES),
                        help="comma-separated NAME=PATH[@FORMAT] pool traces (FORMAT events, bamboo or skypilot; "
                             "default bamboo); default: Bamboo's p3 and g4dn")
    parser.add_argument("--sources", default=None,
                        help="comma-separated, of the traces' names and NAME_iid for their i.i.d. controls "
                             "(default: all)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of " + ", ".join(STRATEGIES))
    parser.add_argument("--replicas", default=",".join(map(str, REPLICAS)),
                        help="comma-separated, of " + ", ".join(map(str, REPLICAS)) + " (nodes a stage)")
    args = parser.parse_args(argv)
    check_arguments(args)
    traces = parse_traces(args.traces)
    allowed = sources_of(traces)
    sources, strategies = (args.sources or ",".join(allowed)).split(","), args.strategies.split(",")
    if any(s not in allowed for s in sources) or len(set(sources)) != len(sources):
        refuse("--sources", args.sources, f"a comma-separated list of {', '.join(allowed)}, each once")
    replicas = args.replicas.split(",")
    if any(r not in map(str, REPLICAS) for r in replicas) or len(set(replicas)) != len(replicas):
        refuse("--replicas", args.replicas, f"a comma-separated list of {', '.join(map(str, REPLICAS))}, each once")
    if any(s not in STRATEGIES for s in strategies) or len(set(strategies)) != len(strategies):
        refuse("--strategies", args.strategies, f"a comma-separated list of {', '.join(STRATEGIES)}, each once")
    T, target = calibration_of(args)
    start, out = time.perf_counter(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rates = {(t.name, r): measured_rate(t, r) for t in traces for r in REPLICAS}
    (out / "rates.json").write_text(json.dumps({f"{t}_R{r}": v for (t, r), v in rates.items()}, indent=1) + "\n")
    level = size_overrides(args.size) if args.size != 8 else []
    common = [*([f"data={args.data}"] if args.data else []), f"trainer.target_loss={target}", *regime(T, CAP),
              *level, *args.set]
    with archived(out):
        if args.report_only:
            runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/summary.json"))]
        else:
            groups = [(pts, out / "runs", [*common, *extra])
                      for pts, extra in points(traces, sources, strategies, args.seeds, rates,
                                               tuple(int(r) for r in replicas))]
            runs = [r for group in run_groups(groups, args.jobs) for r in group]
        frame = records(runs, traces, rates)
        frame.to_csv(out / "traces.csv", index=False)
        minutes = None if args.report_only or not RAN else (time.perf_counter() - start) / 60
        environment = describe([r.get("environment") for r in runs if "config" in r],
                               calibration_file(args).get("environments", []))
        print(report(frame, T, target, rates, out, minutes, args.jobs, environment))
        plot(frame, out / "traces.png")
        print(f"{len(runs)} runs; {run_seconds(runs) / 60:.1f} run-minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
