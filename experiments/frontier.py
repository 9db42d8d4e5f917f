"""The memory-time frontier: hours to target against the memory a node holds for others, per recovery.

Between "no copy" (CheckFree, CheckFree+) and "a whole copy" (``snapshot_restore``: weights + Adam of a
neighbour in each node's RAM, re-sent every few iterations) lie cheaper copies: ``compressed_snapshot`` in bf16
(1/6 of the bytes) and int8 (1/12). This experiment puts every one on the same axes, in the crossover's regime
(``experiments/crossover.py``: the Table 2 regime on ``--data`` at 16 %/h, one link of ``b`` bits/s per node to
its peers and to storage, recoveries priced by the bytes they move at llama_500m's size, copies at the period
the link sustains, ``every: auto``), at two bandwidths (56 Mb/s, 1.8 Gb/s):

* hours to target / T (the paper's metric), mean ± 95 % CI over seeds;
* memory a node holds for others and bytes the run moves per hour, *at llama_500m's size*
  (``memory_overhead_priced_bytes_per_node``, its busiest node; ``moved_priced_bytes``; docs/clock.md,
  "Memory and bytes at the priced size");
* the Pareto frontier: the strategies no other beats on both hours to target and memory.

Writes ``frontier.csv`` (one row per run), ``frontier.md`` and ``frontier.png`` into ``--out``; resumable, and its
runs are packed into ``runs.parquet`` as every experiment's.

    python experiments/frontier.py [--data pydocs] [--size 8] [--out results/frontier] [--seeds 3] [--jobs 2]
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
from crossover import RATE, bandwidth_of, regime  # noqa: E402
from table2 import (  # noqa: E402
    CAP,
    RAN,
    calibrated_arguments,
    calibration_file,
    calibration_of,
    check_arguments,
    fmt,
    refuse,
    run_seconds,
    runs_of,
)

from checkfree.reports.table2 import paper_iteration_seconds  # noqa: E402
from checkfree.run.provenance import describe  # noqa: E402
from checkfree.simulation import paper_table2  # noqa: E402
from checkfree.storage.archive import archived  # noqa: E402

BANDWIDTHS_MBPS = (56, 1778)
"""Per-node bandwidth in Mb/s: a slow link (where copies cost) and a fast one (where they are nearly free)."""
RECOVERIES: dict[str, list[str]] = {
    "checkfree": ["strategy=checkfree"],
    "checkfree_plus": ["strategy=checkfree_plus"],
    "compressed_int8": ["strategy=compressed_snapshot", "++strategy.encoding=int8", "++strategy.every=auto"],
    "compressed_bf16": ["strategy=compressed_snapshot", "++strategy.encoding=bf16", "++strategy.every=auto"],
    "snapshot_restore": ["strategy=snapshot_restore", "++strategy.every=auto"],
    "redundant": ["strategy=redundant"],
    "checkfree_fit_b2_n10": ["strategy=checkfree_fit", "++strategy.fit_buffer=2", "++strategy.fit_steps=10"],
    "checkfree_fit_b8_n50": ["strategy=checkfree_fit", "++strategy.fit_buffer=8", "++strategy.fit_steps=50"],
}
"""Each point of the frontier: a label and the overrides that make it (Table 2's defaults otherwise). The fitted
rebuild (``checkfree_fit``) at a small buffer and few steps (2 micro-batches, 10 steps: 134 MB a middle node at
llama_500m's size, as much as a (de)embedding replica) and a larger one (8 and 50: 537 MB)."""
FIRST = 6
"""The recoveries the frontier was first run with: their runs keep the numbers they were made under; the ones added
after them are numbered from ``LATER`` on, ``SLOTS`` to a (seed, bandwidth) block (room for recoveries added later
still, without renumbering any run made before)."""
LATER, SLOTS = 1000, 20


def points(labels: list[str], bandwidths: list[float], seeds: int) -> list[tuple[str, int, list[str]]]:
    """Every (recovery, bandwidth, seed) of ``labels``, seed-major, each numbered by its place in the whole grid (all
    recoveries, the first ``FIRST`` before the later ones; the default bandwidths before any other): more
    ``--seeds``, other ``--recoveries`` or one of the default ``--bandwidths`` later keep the earlier directories."""
    names, out = list(RECOVERIES), []
    first, later = names[:FIRST], names[FIRST:]
    bands = [*BANDWIDTHS_MBPS, *(b for b in bandwidths if b not in BANDWIDTHS_MBPS)]  # the default ones' places first
    for seed in range(seeds):
        for b in bandwidths:
            block = seed * len(bands) + bands.index(b)
            for label in labels:
                index = block * len(first) + first.index(label) if label in first \
                    else LATER + block * SLOTS + later.index(label)
                bps = b * 1e6 / 8
                out.append(("table2", index, [*RECOVERIES[label], f"network.bandwidth_Bps={bps:g}",
                                              f"network.storage_bandwidth_Bps={bps:g}", f"seed={seed}"]))
    return out


def label_of(summary: dict) -> str:
    """The frontier's name for a run's recovery (a compressed snapshot by its encoding, a fitted rebuild by its
    buffer and steps)."""
    strategy = summary["config"]["strategy"]
    if strategy["name"] == "compressed_snapshot":
        return f"compressed_{strategy['encoding']}"
    if strategy["name"] == "checkfree_fit":
        return f"checkfree_fit_b{strategy['fit_buffer']}_n{strategy['fit_steps']}"
    return strategy["name"]


def records(runs: list[dict], T: int) -> pd.DataFrame:
    rows = []
    for r in runs:
        if "config" not in r or r.get("status") == "running":
            continue  # a run that never started (its failure is in its run directory), or one under way
        seconds = r.get("time_to_target_interp_s")
        hours = r["total_sim_time_s"] / 3600
        memory = r.get("memory_overhead_priced_bytes_per_node")
        rows.append({"recovery": label_of(r), "strategy": r["strategy"], "bandwidth_mbps": bandwidth_of(r),
                     "seed": r["seed"],
                     "reached": seconds is not None,
                     "hours_to_target": seconds / 3600 if seconds is not None else None,
                     "iterations_to_target_over_T": (r["iterations_to_target_interp"] / T
                                                     if r.get("iterations_to_target_interp") is not None else None),
                     "memory_gb_per_node": max(memory) / 1e9 if memory else None,
                     "moved_gb_per_hour": r.get("moved_priced_bytes", 0.0) / 1e9 / hours if hours > 0 else None,
                     "every": r.get("strategy_every"), "failures": r.get("n_failures"),
                     "status": r.get("status"), "wall_s": r.get("total_wall_time_s")})
    return pd.DataFrame(rows)


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """The names among (name, memory, hours) that no other point beats on both: none with at most its memory
    has fewer hours, none with less memory has as few. In order of memory."""
    front, best = [], (math.inf, math.inf)  # the last point on the front: (memory, hours)
    for name, memory, hours in sorted((p for p in points if p[1] == p[1] and p[2] == p[2]),  # NaN: not placed
                                      key=lambda p: (p[1], p[2])):
        if hours < best[1] or (memory, hours) == best:  # an exact tie with a point on the front is on it too
            front.append(name)
            best = (memory, hours)
    return front


def no_failure_hours(strategy: str) -> float:
    """The paper's no-failure time, the denominator of its time-to-target / T: 10,000 iterations at the
    strategy's own measured no-failure seconds at this rate (its Table 2 column), as Table 2's report divides."""
    return paper_iteration_seconds(strategy, paper_table2.RATES.index(RATE)) * paper_table2.PAPER_T / 3600


def summary_rows(frame: pd.DataFrame) -> list[dict]:
    """Per (bandwidth, recovery): time to target / T over the seeds that reached it, memory, bytes an hour."""
    out = []
    for b in sorted(set(frame.bandwidth_mbps)):
        for label in (name for name in RECOVERIES if name in set(frame.recovery)):
            mine = frame[(frame.recovery == label) & (frame.bandwidth_mbps == b)]
            if mine.empty:
                continue  # not run (yet) at this bandwidth
            reached = mine[mine.reached]
            out.append({"bandwidth_mbps": b, "recovery": label, "runs": len(mine), "reached": len(reached),
                        "over_T": [h / no_failure_hours(name) for h, name in zip(reached.hours_to_target,
                                                                                  reached.strategy)],
                        "hours": list(reached.hours_to_target),
                        "memory_gb": float(mine.memory_gb_per_node.max()),
                        "moved_gb_per_hour": float(mine.moved_gb_per_hour.mean())})
    return out


def report(frame: pd.DataFrame, T: int, target: float, out: Path, minutes: float | None, jobs: int,
           environment: str = "") -> str:
    rows = summary_rows(frame)
    lines = []
    for b in sorted(set(frame.bandwidth_mbps)):
        here = [r for r in rows if r["bandwidth_mbps"] == b]
        front = pareto([(r["recovery"], r["memory_gb"], statistics.fmean(r["hours"])) for r in here if r["hours"]])
        lines += [f"At {b:g} Mb/s:", "",
                  "| recovery | hours to target | time to target / T | memory a node holds for others (GB) "
                  "| moved (GB / h) | on the frontier |", "|---|---|---|---|---|---|"]
        for r in here:
            time_cell = (f"{fmt(r['over_T'], '.2f')}" + (f" ({r['reached']}/{r['runs']})" if r["reached"] < r["runs"]
                                                       else "")) if r["over_T"] else f"— (0/{r['runs']})"
            hours_cell = fmt(r["hours"], ".0f") if r["hours"] else "—"
            lines.append(f"| {r['recovery']} | {hours_cell} | {time_cell} | {r['memory_gb']:.3f} | "
                         f"{r['moved_gb_per_hour']:.2f} | "
                         f"{'yes' if r['recovery'] in front else ''} |")
        lines.append("")
    text = "\n".join(lines) + "\n" + (
        f"Time to target / T: paper hours over the no-failure time, mean ± 95 % CI over the seeds that reached the "
        f"target within {CAP:g} T (in brackets where not all did), at {RATE:.0%}/h, T = {T}, target {target}. Memory "
        "and bytes at llama_500m's size (the busiest node's held copies and staging buffers; every byte sent, "
        "uploaded or received in a recovery, per simulated hour; not the copies made anew for a replaced node after "
        "its rebuild, which understates redundant computation's, whose lost shadow is made again). The frontier: no "
        "other recovery has as little memory and reaches the target in fewer hours (redundant computation's dearer "
        "iteration counts there, not in its time / T). "
        + (f"Wall time of this invocation {minutes:.1f} min ({jobs} jobs); " if minutes is not None
           else "Written from the runs there; ")
        + f"{frame.wall_s.fillna(0).sum() / 60:.1f} run-minutes in all.\n" + (f"\n{environment}\n" if environment else ""))
    (out / "frontier.md").write_text(text)
    return text


def plot(frame: pd.DataFrame, T: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(frame)
    bandwidths = sorted(set(frame.bandwidth_mbps))
    fig, axes = plt.subplots(1, len(bandwidths), figsize=(5.5 * len(bandwidths), 4.2), squeeze=False)
    for ax, b in zip(axes[0], bandwidths):
        here = [r for r in rows if r["bandwidth_mbps"] == b and r["hours"]]
        for r in here:
            mean = statistics.fmean(r["hours"])
            ax.scatter(max(r["memory_gb"], 1e-3), mean)
            ax.annotate(r["recovery"], (max(r["memory_gb"], 1e-3), mean), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto([(r["recovery"], r["memory_gb"], statistics.fmean(r["hours"])) for r in here])
        xy = sorted((max(r["memory_gb"], 1e-3), statistics.fmean(r["hours"])) for r in here if r["recovery"] in front)
        if xy:
            ax.step([x for x, _ in xy], [y for _, y in xy], where="post", color="grey", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("memory a node holds for others at llama_500m's size (GB)")
        ax.set_ylabel("paper hours to target")
        ax.set_title(f"{b:g} Mb/s, {RATE:.0%}/h", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_arguments(parser, "frontier")
    parser.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS_MBPS)), help="Mb/s, comma-separated")
    parser.add_argument("--recoveries", default=",".join(RECOVERIES), help="comma-separated, of " + ", ".join(RECOVERIES))
    args = parser.parse_args(argv)
    check_arguments(args)
    unknown = [r for r in args.recoveries.split(",") if r not in RECOVERIES]
    if unknown:
        refuse("--recoveries", args.recoveries, f"a comma-separated list of {', '.join(RECOVERIES)}")
    T, target = calibration_of(args)
    start, out = time.perf_counter(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid = points(args.recoveries.split(","), [float(b) for b in args.bandwidths.split(",")], args.seeds)
    with archived(out):  # its runs come from, and go back into, out/runs.parquet
        runs = runs_of(args, out, grid, regime(T, target, args.data))
        frame = records(runs, T)
        frame.to_csv(out / "frontier.csv", index=False)
        minutes = None if args.report_only or not RAN else (time.perf_counter() - start) / 60
        environment = describe([r.get("environment") for r in runs if "config" in r],
                               calibration_file(args).get("environments", []))
        print(report(frame, T, target, out, minutes, args.jobs, environment))
        plot(frame, T, out / "frontier.png")
        print(f"{len(runs)} runs; {run_seconds(runs) / 60:.1f} run-minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
