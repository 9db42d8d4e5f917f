"""When does CheckFree win? Hours to target against per-node bandwidth, in the Table 2 regime on real text.

The modern checkpointing baselines move a stage's whole state (weights + Adam, ~3x its weights) every few
iterations: to storage in the background (``async_checkpoint``), to peers' RAM (``memory_checkpoint``, whole-
pipeline rollback; ``snapshot_restore``, only the lost stage). How often they can afford to, and how long a
restore takes, depend on the bandwidth each node has; CheckFree moves only a neighbour's weights, and only
when a stage is lost. So there is a crossover, and this experiment finds it:

* the regime of ``experiments/table2.py`` on ``--data`` (default pydocs, d=64, 6 stages, paper clock at
  16 %/h, T and the target from that corpus' calibration, runs stopped at the target or after 4 T);
* every node has ``b`` bits/s to its peers and to storage (``network.name=single_cluster``,
  ``network.bandwidth_Bps = network.storage_bandwidth_Bps = b / 8``), ``b`` on a log scale from 10 Mb/s to
  10 Gb/s;
* the three baselines at the best period ``b`` sustains (``strategy.every=auto``: CheckFreq's rule, a copy
  ends before the next starts), ``memory_checkpoint`` falling back to a storage checkpoint every T / 10;
  CheckFree (edges copied, as Table 2's row) and CheckFree+;
* recoveries priced by what they move (``trainer.paper_recovery=priced``: the replacement delay + the bytes,
  at llama_500m's size, over the link or from storage) — at 10 Mb/s a snapshot cannot come back in 30 s, and
  neither can CheckFree's neighbours' weights. Iterations cost the paper's measured CheckFree time — or, on a
  link too slow to carry the pipeline's own activations in that time, what they need (215 s per paper
  iteration at 10 Mb/s) — plus what the cost model charges for background copies and synchronous saves.
  Background copies get only the part of each iteration the pipeline's traffic leaves the node's interface
  (``Clock.link_busy``; docs/design.md, 'The simulated clock'), so at 10 Mb/s, where the pipeline fills the
  link, every snapshot and upload is paid in full as a stall.

Writes ``crossover.csv`` (one row per run), ``crossover.md`` (hours to target per strategy and bandwidth,
mean ± 95 % CI over seeds; CheckFree's paired speed-up over each baseline; the crossover bandwidth) and
``crossover.png`` into ``--out``. Resumable: a finished run is not run again.

    python experiments/crossover.py [--data pydocs] [--out results/crossover] [--seeds 3] [--jobs 2]
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
from table2 import (  # noqa: E402
    CAP,
    RAN,
    calibrated_arguments,
    calibration_file,
    calibration_of,
    check_arguments,
    fmt,
    run_seconds,
    runs_of,
)

from checkfree.reports.table2 import ci95  # noqa: E402
from checkfree.run.provenance import describe  # noqa: E402
from checkfree.storage.archive import archived  # noqa: E402

BANDWIDTHS_MBPS = (10, 56, 316, 1778, 10000)
"""Per-node bandwidth in Mb/s: five points, evenly spaced on a log scale from 10 Mb/s to 10 Gb/s."""
BASELINES = ("async_checkpoint", "memory_checkpoint", "snapshot_restore")
CHECKFREE = ("checkfree", "checkfree_plus")
RATE = 0.16


def points(strategies: list[str], bandwidths: list[float], seeds: int) -> list[tuple[str, int, list[str]]]:
    """Every (strategy, bandwidth, seed): a point's index names its run directory. Seed-major, so that a later
    invocation with more ``--seeds`` keeps the earlier seeds' directories (and does not run them again)."""
    out = []
    for seed in range(seeds):
        for b in bandwidths:
            for name in strategies:
                bps = b * 1e6 / 8
                overrides = [f"strategy={name}", f"network.bandwidth_Bps={bps:g}",
                             f"network.storage_bandwidth_Bps={bps:g}", f"seed={seed}"]
                if name in BASELINES:
                    overrides.append("++strategy.every=auto")
                out.append(("table2", len(out), overrides))
    return out


def regime(T: int, target: float, data: str | None, rate: float = RATE) -> list[str]:
    """Table 2's regime for calibrated T (no fixed checkpoint period: every baseline picks its own)."""
    return [*([f"data={data}"] if data else []), f"trainer.target_loss={target}", f"trainer.paper_T={T}",
            f"trainer.iterations={math.ceil(CAP * T)}", f"failure.hourly_rate={rate}",
            "network.name=single_cluster", "trainer.paper_recovery=priced",
            f"++strategy.storage_every={max(1, round(T / 10))}"]


def bandwidth_of(summary: dict) -> float:
    return summary["config"]["network"]["bandwidth_Bps"] * 8 / 1e6


def records(runs: list[dict], T: int) -> pd.DataFrame:
    rows = []
    for r in runs:
        if "config" not in r:
            continue  # a run that never started (its failure is in its run directory)
        hours = r.get("time_to_target_interp_s")
        rows.append({"strategy": r["strategy"], "bandwidth_mbps": bandwidth_of(r), "seed": r["seed"],
                     "reached": hours is not None, "hours_to_target": hours / 3600 if hours is not None else None,
                     "iterations_to_target_over_T": (r["iterations_to_target_interp"] / T
                                                     if r.get("iterations_to_target_interp") is not None else None),
                     "every": r.get("strategy_every"), "failures": r.get("n_failures"),
                     "lost_iterations": r.get("lost_iterations"), "recovery_h": r.get("recovery_sim_s", 0) / 3600,
                     "overhead_h": r.get("overhead_sim_s", 0) / 3600, "lost_work_h": r.get("lost_work_sim_s", 0) / 3600,
                     "memory_overhead_gb_per_node": max(r.get("memory_overhead_bytes_per_node") or [0]) / 1e9,
                     "status": r.get("status"), "wall_s": r.get("total_wall_time_s")})
    return pd.DataFrame(rows)


def paired_by_seed(frame: pd.DataFrame, baseline: str, b: float) -> dict[int, float]:
    """Seed -> the best CheckFree variant's speed-up over ``baseline`` at bandwidth ``b`` (the same failure
    times strike both at a seed): baseline hours / CheckFree hours. A seed whose baseline, or both of whose
    CheckFree variants, missed the target within the cap has no ratio (the table counts who reached it)."""
    here = frame[frame.bandwidth_mbps == b]
    out = {}
    for seed in sorted(set(here.seed)):
        mine = here[here.seed == seed]
        cf = mine[mine.strategy.isin(CHECKFREE) & mine.reached].hours_to_target
        base = mine[(mine.strategy == baseline) & mine.reached].hours_to_target
        if len(cf) and len(base):
            out[int(seed)] = float(base.iloc[0]) / float(cf.min())
    return out


def paired_speedups(frame: pd.DataFrame, baseline: str, b: float) -> list[float]:
    return list(paired_by_seed(frame, baseline, b).values())


def log_crossing(curve: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """The first place where a speed-up against bandwidth crosses 1, interpolated linearly in log bandwidth
    between the two points around it: (bandwidth, the point below, the point above); None without a crossing.
    Missing points (NaN) are skipped."""
    points = [(b, m) for b, m in curve if m == m]
    for (b0, m0), (b1, m1) in zip(points, points[1:]):
        if (m0 - 1) * (m1 - 1) < 0 or (m1 == 1 and m0 != 1):  # an exact 1 is a crossing at that point
            x = math.log(b0) + (1 - m0) / (m1 - m0) * (math.log(b1) - math.log(b0))
            return math.exp(x), b0, b1
    return None


def seed_crossings(frame: pd.DataFrame, baseline: str) -> dict[int, float | None]:
    """Each seed's own crossover bandwidth (its paired speed-ups against bandwidth; ``log_crossing``): the
    spread of these is the crossover's uncertainty."""
    bandwidths = sorted(set(frame.bandwidth_mbps))
    by_b = {b: paired_by_seed(frame, baseline, b) for b in bandwidths}
    seeds = sorted({seed for ratios in by_b.values() for seed in ratios})
    out = {}
    for seed in seeds:
        crossing = log_crossing([(b, by_b[b].get(seed, math.nan)) for b in bandwidths])
        out[seed] = crossing[0] if crossing else None
    return out


def crossover(frame: pd.DataFrame, baseline: str) -> str:
    """The bandwidth below which CheckFree(+) reaches the target first: where the mean paired speed-up crosses
    1, interpolated on the log scale between the two bandwidths around it; its uncertainty as each seed's own
    crossing and, with two or more, their geometric mean ± the 95 % CI of the mean log; and the bandwidths
    whose 95 % CI of the speed-up contains 1 (where the data cannot tell)."""
    bandwidths = sorted(set(frame.bandwidth_mbps))
    means, unsure = [], []
    for b in bandwidths:
        ratios = paired_speedups(frame, baseline, b)
        means.append(statistics.fmean(ratios) if ratios else math.nan)
        half = ci95(ratios)
        if ratios and math.isfinite(half) and abs(means[-1] - 1) <= half:
            unsure.append(b)
    crossing = log_crossing(list(zip(bandwidths, means)))
    if crossing is None:
        side = "faster" if all(m > 1 for m in means if m == m) else "slower" if all(m < 1 for m in means if m == m) \
            else "mixed"
        text = {"faster": f"CheckFree(+) reaches the target first at every bandwidth tried ({bandwidths[0]:g} to "
                          f"{bandwidths[-1]:g} Mb/s)",
                "slower": f"{baseline} reaches the target first at every bandwidth tried",
                "mixed": "no clean crossing (missing points)"}[side]
    else:
        text = f"~{crossing[0]:.0f} Mb/s (the mean speed-up's, between {crossing[1]:g} and {crossing[2]:g})"
    per_seed = seed_crossings(frame, baseline) if crossing is not None else {}
    if per_seed:
        text += "; the seeds' own: " + " / ".join(f"{b:.0f}" if b is not None else "none"
                                                  for b in per_seed.values()) + " Mb/s"
        logs = [math.log(b) for b in per_seed.values() if b is not None]
        if None in per_seed.values():  # a seed that never crosses has no place in a mean of crossings
            text += f" ({len(logs)} of {len(per_seed)} seeds cross)"
        elif math.isfinite(half := ci95(logs)):
            centre = statistics.fmean(logs)
            text += (f" (geometric mean {math.exp(centre):.0f}, 95 % CI of the mean log {math.exp(centre - half):.0f} "
                     f"to {math.exp(centre + half):.0f})")
    if unsure:
        text += f"; the 95 % CI of the speed-up contains 1 at {', '.join(f'{b:g}' for b in unsure)} Mb/s"
    return text


def report(frame: pd.DataFrame, T: int, target: float, out: Path, minutes: float | None, jobs: int,
           rate: float = RATE, environment: str = "") -> str:
    bandwidths = sorted(set(frame.bandwidth_mbps))
    strategies = [s for s in (*BASELINES, *CHECKFREE) if s in set(frame.strategy)]
    header = "| strategy | " + " | ".join(f"{b:g} Mb/s" for b in bandwidths) + " |"
    lines = [header, "|---|" + "---|" * len(bandwidths)]
    for name in strategies:
        cells = []
        for b in bandwidths:
            mine = frame[(frame.strategy == name) & (frame.bandwidth_mbps == b)]
            hours = [h for h in mine.hours_to_target if h == h and h is not None]
            every = sorted({int(e) for e in mine.every if e == e and e is not None})
            period = f", every {every[0]}" if len(every) == 1 else ""
            cells.append(f"{fmt(hours, '.0f')} ({len(hours)}/{len(mine)}{period})" if hours
                         else f"— (0/{len(mine)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    speed = ["", "| CheckFree(+)'s speed-up over | " + " | ".join(f"{b:g} Mb/s" for b in bandwidths)
             + " | crossover |", "|---|" + "---|" * (len(bandwidths) + 1)]
    for baseline in (b for b in BASELINES if b in strategies):
        cells = []
        for b in bandwidths:
            ratios = paired_speedups(frame, baseline, b)
            cells.append(fmt(ratios, ".2f") if ratios else "—")
        speed.append(f"| {baseline} | " + " | ".join(cells) + f" | {crossover(frame, baseline)} |")
    text = "\n".join(lines + speed) + (
        f"\n\nHours to target (paper hours, mean ± 95 % CI over seeds; in brackets the runs that reached the target "
        f"within {CAP:g} T, and the period `every: auto` chose) at {rate:.0%}/h, T = {T}, target {target}. "
        "Speed-up: per seed, the baseline's hours over the faster CheckFree variant's (the same failure times "
        "strike both). "
        + (f"Wall time of this invocation {minutes:.1f} min ({jobs} jobs); " if minutes is not None
           else "Written from the runs there (their wall time: wall_time.txt); ")
        + f"{frame.wall_s.fillna(0).sum() / 60:.1f} run-minutes in all.\n" + (f"\n{environment}\n" if environment else ""))
    (out / "crossover.md").write_text(text)
    return text


def plot(frame: pd.DataFrame, path: Path, rate: float = RATE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, rows in frame[frame.reached].groupby("strategy"):
        stats = rows.groupby("bandwidth_mbps").hours_to_target.agg(list)
        xs = list(stats.index)
        means = [statistics.fmean(v) for v in stats]
        errors = [ci95(v) if len(v) > 1 else 0.0 for v in stats]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=name)
    seeds = frame.seed.nunique()
    ax.set_xscale("log")
    ax.set_yscale("log")  # 10 Mb/s costs several times what the rest do
    ax.set_xlabel("per-node bandwidth (Mb/s)")
    ax.set_ylabel("paper hours to target")
    ax.set_title(f"When does CheckFree win? ({rate:.0%}/h, " + ("mean ± 95 % CI over " if seeds > 1 else "")
                 + f"{seeds} seed{'s' if seeds > 1 else ''})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    calibrated_arguments(parser, "crossover")
    parser.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS_MBPS)), help="Mb/s, comma-separated")
    parser.add_argument("--strategies", default=",".join((*BASELINES, *CHECKFREE)))
    parser.add_argument("--rate", type=float, default=RATE, help="hourly failure rate per stage")
    args = parser.parse_args(argv)
    check_arguments(args)
    T, target = calibration_of(args)
    start, out = time.perf_counter(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid = points(args.strategies.split(","), [float(b) for b in args.bandwidths.split(",")], args.seeds)
    with archived(out):  # its runs come from, and go back into, out/runs.parquet
        runs = runs_of(args, out, grid, regime(T, target, args.data, args.rate))
        frame = records(runs, T)
        frame.to_csv(out / "crossover.csv", index=False)
        minutes = None if args.report_only or not RAN else (time.perf_counter() - start) / 60
        environment = describe([r.get("environment") for r in runs if "config" in r],
                               calibration_file(args).get("environments", []))
        text = report(frame, T, target, out, minutes, args.jobs, args.rate, environment)
        plot(frame, out / "crossover.png", args.rate)
        print(text)
        print(f"{len(runs)} runs; {run_seconds(runs) / 60:.1f} run-minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
