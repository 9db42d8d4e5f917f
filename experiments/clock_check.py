"""The simulated clock against emulated runs: how far its price of an iteration, and of the upkeep after one, is
from what a run with every byte on the network's links really takes.

Every hour our tables report is priced by ``checkfree/simulation/cost.py``. Here the process engine runs the
same model with ``engine.shape=true`` (every activation, gradient, copy and checkpoint shard takes the time its
link gives it: ``checkfree/transport/shaper.py``), and the cost-model clock of the same run prices the same
iterations: the trained model itself (``trainer.clock_preset=null``), on this machine's measured FLOP/s, with the
fp32 activations the processes send (``conf/sweep/clock_check.yaml``). Per run, iteration by iteration (the
first two, torch's warm-up, and the validation's left out): the measured seconds between two records against the
simulated seconds the clock added, split into plain iterations and iterations with upkeep (a checkpoint, a
snapshot). For ``checkfree``, ``checkfree_plus``, ``checkpoint``, ``async_checkpoint``, ``snapshot_restore``
and ``redundant`` on two networks (the geo-distributed table, its links ``--geo-scale`` times slower, and one
cluster), ``--seeds`` seeds. Without failures: losses executed on the real clock and the components they price
(recovery, rollback, lost work) are not built yet (issue 36, item 2).

On 2 cores the stage processes (6 of them) share the CPU: where stages compute at once, each computes slower
than the clock's one device per stage assumes. That error is the emulation's, not the clock's, and it is largest
where compute dominates (one cluster).

Writes ``clock_check.csv`` (one row per run) and ``clock_check.md`` into ``--out``; resumable; runs one at a
time (a timing beside another run's would measure the contention).

    python experiments/clock_check.py [--out results/clock_check] [--seeds 2] [--geo-scale 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd  # noqa: E402
from sweep import ROOT  # noqa: E402
from table2 import RAN, refuse, run_all, run_seconds  # noqa: E402

from checkfree.run.provenance import describe  # noqa: E402
from checkfree.run.runlog import TIMINGS, keep_timings, read_metrics  # noqa: E402
from checkfree.storage.archive import archived  # noqa: E402

STRATEGIES: dict[str, list[str]] = {
    "checkfree": ["strategy=checkfree"],
    "checkfree_plus": ["strategy=checkfree_plus"],
    "checkpoint": ["strategy=checkpoint", "strategy.every=6"],
    "async_checkpoint": ["strategy=async_checkpoint", "strategy.every=6"],
    "snapshot_restore": ["strategy=snapshot_restore", "strategy.every=6"],
    "redundant": ["strategy=redundant"],
}
"""Each strategy and its overrides: the copies and checkpoints every 6 iterations (3 in a run of 24)."""
NETWORKS = ("geo_distributed", "single_cluster")
WARM_UP = 2
"""Iterations left out at the start: torch's first forward and backward allocate and pick kernels."""


def points(strategies: list[str], seeds: int, geo_scale: float) -> list[tuple[str, int, list[str]]]:
    out = []
    for seed in range(seeds):
        for n, network in enumerate(NETWORKS):
            scale = [f"network.link_scale={geo_scale:g}"] if network == "geo_distributed" else []
            for label in strategies:
                index = (seed * len(NETWORKS) + n) * 10 + list(STRATEGIES).index(label)
                out.append(("clock_check", index, [*STRATEGIES[label], f"network={network}", *scale, f"seed={seed}"]))
    return out


def pairs(records: list[dict]) -> list[dict]:
    """Each compared iteration: the wall seconds and the simulated seconds since the record before, and whether
    the clock charged upkeep in it. Left out: the warm-up, a record with a validation (its time is the eval's
    too) and any iteration that lost a stage."""
    out = []
    for before, now in zip(records, records[1:]):
        if now["iteration"] <= WARM_UP or "val_loss" in now or now.get("failed_stages"):
            continue
        out.append({"measured_s": now["wall_time_s"] - before["wall_time_s"],
                    "predicted_s": now["sim_time_s"] - before["sim_time_s"],
                    "upkeep": (now.get("overhead_sim_s") or 0.0) > 0})
    return out


def errors(rows: list[dict]) -> dict:
    """Mean measured and predicted seconds, the error of the mean ((predicted - measured) / measured) and the
    mean absolute percentage error of the iterations one by one; NaN where there are none."""
    if not rows:
        return {"n": 0, "measured_s": math.nan, "predicted_s": math.nan, "error": math.nan, "mape": math.nan}
    m = statistics.fmean(r["measured_s"] for r in rows)
    p = statistics.fmean(r["predicted_s"] for r in rows)
    return {"n": len(rows), "measured_s": m, "predicted_s": p, "error": (p - m) / m,
            "mape": statistics.fmean(abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"] for r in rows)}


def records_of(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for r in runs:
        if "config" not in r or r.get("status") != "completed":
            continue
        timings = Path(r["run_dir"]) / TIMINGS
        compared = pairs(read_metrics(timings))
        plain, upkeep = errors([x for x in compared if not x["upkeep"]]), errors([x for x in compared if x["upkeep"]])
        rows.append({"strategy": r["strategy"], "network": r["config"]["network"]["name"],
                     "link_scale": r["config"]["network"]["link_scale"], "seed": r["seed"],
                     **{f"iteration_{k}": v for k, v in plain.items()}, **{f"upkeep_{k}": v for k, v in upkeep.items()},
                     "total_error": errors(compared)["error"], "wall_s": r.get("total_wall_time_s")})
    return pd.DataFrame(rows)


def ranking(frame: pd.DataFrame, column: str) -> list[str]:
    """The strategies from the fastest to the slowest by ``column`` (mean over seeds)."""
    return list(frame.groupby("strategy")[column].mean().sort_values().index)


def mean(rows: pd.DataFrame, column: str, spec: str) -> str:
    return f"{rows[column].mean():{spec}}" if rows[column].notna().any() else "—"


def report(frame: pd.DataFrame, out: Path, minutes: float | None, environment: str) -> str:
    lines = ["| network | strategy | seeds | iteration measured (s) | predicted (s) | error | MAPE "
             "| upkeep iterations measured (s) | predicted (s) | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for network in NETWORKS:
        here = frame[frame.network == network]
        for strategy in (s for s in STRATEGIES if s in set(here.strategy)):
            mine = here[here.strategy == strategy]
            lines.append(f"| {network} | {strategy} | {len(mine)} | {mean(mine, 'iteration_measured_s', '.3f')} "
                         f"| {mean(mine, 'iteration_predicted_s', '.3f')} | {mean(mine, 'iteration_error', '+.1%')} "
                         f"| {mean(mine, 'iteration_mape', '.1%')} | {mean(mine, 'upkeep_measured_s', '.3f')} "
                         f"| {mean(mine, 'upkeep_predicted_s', '.3f')} | {mean(mine, 'upkeep_error', '+.1%')} |")
    lines.append("")
    for network in NETWORKS:
        here = frame[frame.network == network]
        if here.empty:
            continue
        scale = here.link_scale.iloc[0]
        measured = ranking(here.assign(t=here.iteration_measured_s), "t")
        predicted = ranking(here.assign(t=here.iteration_predicted_s), "t")
        lines += [f"{network}{f' (links x {scale:g} slower)' if scale != 1 else ''}: mean absolute error of the "
                  f"iteration's price {here.iteration_error.abs().mean():.1%} over {len(here)} runs "
                  f"(largest {here.iteration_error.abs().max():.1%}); strategies by measured iteration "
                  f"{', '.join(measured)}; by predicted {', '.join(predicted)} "
                  f"({'the same ranking' if measured == predicted else 'not the same ranking'}).", ""]
    text = "\n".join(lines) + (
        "Per run: every iteration after the first two whose record has no validation, its wall seconds since the "
        "record before (measured: the process engine, every byte shaped to its link) against the simulated seconds "
        "the run's clock added (predicted: the cost model at this machine's measured FLOP/s); error = (predicted - "
        "measured) / measured of the means; MAPE = the iterations' mean absolute percentage error. Upkeep "
        "iterations: those the clock charged a checkpoint or a copy in. Mean over seeds. No failures (losses on the "
        "real clock are not built yet). "
        + (f"Wall time of this invocation {minutes:.1f} min; " if minutes is not None else "Written from the runs there; ")
        + f"{frame.wall_s.fillna(0).sum() / 60:.1f} run-minutes in all.\n" + (f"\n{environment}\n" if environment else ""))
    (out / "clock_check.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "clock_check")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--geo-scale", type=float, default=1.0, help="network.link_scale of the geo network's runs")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of " + ", ".join(STRATEGIES))
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    args = parser.parse_args(argv)
    RAN.clear()
    if args.seeds < 1:
        refuse("--seeds", args.seeds, "allowed is an integer >= 1")
    if not (math.isfinite(args.geo_scale) and 1e-6 <= args.geo_scale <= 1e6):
        refuse("--geo-scale", args.geo_scale, "allowed is a number from 1e-6 to 1e6 (network.link_scale)")
    strategies = args.strategies.split(",")
    if any(s not in STRATEGIES for s in strategies):
        refuse("--strategies", args.strategies, f"a comma-separated list of {', '.join(STRATEGIES)}")
    start, out = time.perf_counter(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with archived(out):
        if args.report_only:
            runs = [{**json.loads(p.read_text()), "run_dir": str(p.parent)}
                    for p in sorted((out / "clock_check").glob("*/summary.json"))]
        else:
            runs = run_all(points(strategies, args.seeds, args.geo_scale), out, [], jobs=1)
            for r in runs:
                if not (Path(r["run_dir"]) / TIMINGS).is_file():
                    keep_timings(Path(r["run_dir"]))
        frame = records_of(runs)
        frame.to_csv(out / "clock_check.csv", index=False)
        minutes = None if args.report_only or not RAN else (time.perf_counter() - start) / 60
        environment = describe([r.get("environment") for r in runs if "config" in r], [])
        print(report(frame, out, minutes, environment))
        print(f"{len(runs)} runs; {run_seconds(runs) / 60:.1f} run-minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
