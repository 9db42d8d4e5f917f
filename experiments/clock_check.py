"""The simulated clock against emulated runs: how far its price of an iteration, and of the upkeep after one, is
from what a run with every byte on the network's links really takes.

Every hour our tables report is priced by ``checkfree/simulation/cost.py``. Here the process engine runs the
same model with ``engine.shape=true`` (every activation, gradient, copy and checkpoint shard takes the time its
link gives it: ``checkfree/transport/shaper.py``), and the cost-model clock of the same run prices the same
iterations: the trained model itself (``trainer.clock_preset=null``), at the FLOP/s this machine reaches on it
(``network.device=profiled``), with the fp32 activations the processes send (``conf/sweep/clock_check.yaml``).
Per run, iteration by iteration (the first two, torch's warm-up, and the validation's left out): the measured
seconds between two records against the simulated seconds the clock added, split into plain iterations and
iterations with upkeep (a checkpoint, a snapshot). For ``checkfree``, ``checkfree_plus``, ``checkpoint``, ``async_checkpoint``,
``snapshot_restore`` and ``redundant`` (its shadows computed: ``STRATEGIES``) on two networks (the geo-distributed table, its links ``--geo-scale`` times slower, and one
cluster), ``--seeds`` seeds. With ``--struck`` every point runs a second time struck by two losses on the wall
clock (``engine.failure_clock=wall``: the stage's process SIGKILLed at its time, the replacement 1 s later:
``KILLS``), and each recovery's real seconds are compared with the clock's price of it, and each iteration that
lost a stage with what the clock added for it: the run's own clock meets the same losses as they come.

On 2 cores the stage processes (6 of them) share the CPU: where stages compute at once, each computes slower
than the clock's one device per stage assumes. That error is the emulation's, not the clock's, and it is largest
where compute dominates (one cluster).

Writes ``clock_check.csv`` (one row per run) and ``clock_check.md`` into ``--out``; resumable; runs one at a
time (a timing beside another run's would measure the contention).

With ``--table links.csv --out DIR`` the geo network's runs take their links from that file (``network.table``:
another set of measured links, a held-out check of the clock) and one cluster's are not run again.

With ``--compute-time cpu --out DIR`` every stage process keeps its own core's clock (``engine.compute_time=cpu``:
its CPU seconds, and the waits its links give it jumped over; ``checkfree/transport/core_clock.py``), so one
cluster can be checked on a machine with fewer cores than stages; the geo network's runs beside them say whether
the core clocks time what the wall clock does where the wall clock is right. Struck, a core a stage, the losses
come in simulated time (``CORE_LOSSES``) and the replacement's delay in the processes' time.

    python experiments/clock_check.py [--out results/clock_check] [--seeds 2] [--geo-scale 1] [--struck]
    python experiments/clock_check.py --table links.csv --out results/clock_check_links [--seeds 2] [--struck]
    python experiments/clock_check.py --compute-time cpu --out results/clock_check_cores [--seeds 2] [--struck]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd  # noqa: E402
from sweep import ROOT  # noqa: E402
from table2 import RAN, refuse, run_groups, run_seconds  # noqa: E402

from checkfree.run.provenance import describe  # noqa: E402
from checkfree.run.runlog import TIMINGS, keep_timings, read_metrics  # noqa: E402
from checkfree.storage.archive import ARCHIVE, archived  # noqa: E402

STRATEGIES: dict[str, list[str]] = {
    "checkfree": ["strategy=checkfree"],
    "checkfree_plus": ["strategy=checkfree_plus"],
    "checkpoint": ["strategy=checkpoint", "strategy.every=6"],
    "async_checkpoint": ["strategy=async_checkpoint", "strategy.every=6"],
    "snapshot_restore": ["strategy=snapshot_restore", "strategy.every=6"],
    "redundant": ["strategy=redundant", "engine.shadows=compute"],
}
"""Each strategy and its overrides: the copies and checkpoints every 6 iterations (3 in a run of 24).
``redundant`` with its shadows computed by their keepers (``engine.shadows=compute``: Bamboo's forward and
backward of the successor on every micro-batch, and its gradient's extra hop), what the clock prices; with the
engines' default, copied after every step, an emulated run would measure a copy the clock does not price and
miss the compute it does."""
NETWORKS = ("geo_distributed", "single_cluster")
KILLS: dict[str, list[dict]] = {
    "geo_distributed": [{"time_s": 10.0, "stage": 2}, {"time_s": 20.0, "stage": 3}],
    "single_cluster": [{"time_s": 4.0, "stage": 2}, {"time_s": 8.0, "stage": 3}],
}
"""The losses of the struck runs, in wall seconds since training began (``engine.failure_clock=wall``): two
intermediate stages, a third and two thirds into a run of 24 iterations on each network (~30 s on the geo
network, ~14 s on one cluster, measured without failures); the same for every strategy and seed."""
CORE_LOSSES: list[dict] = [{"iteration": 8, "stage": 2}, {"iteration": 16, "stage": 3}]
"""The struck runs' losses on a core a stage (``--compute-time cpu``): the same two stages, a third and two thirds
into the run, at the start of an iteration in simulated time (a wall-clock kill falls at a time no core clock
keeps); the engine kills the stage's process then, and the replacement's delay passes in the processes' time."""
DELAY = "network.replacement_delay_s=1"
"""Every struck run's replacement delay: 1 s (of real time on the wall clock, of the processes' time on core clocks)."""
STRUCK = ["engine.failure_clock=wall", DELAY]
"""The struck runs' settings besides their trace: each replacement comes 1 s of real time after its loss."""
STRUCK_AT = 100
"""Run directories of the struck runs are numbered from here (the calm runs' numbers stay as they were)."""
WARM_UP = 2
"""Iterations left out at the start: torch's first forward and backward allocate and pick kernels."""


def points(strategies: list[str], seeds: int, geo_scale: float, network: str,
           struck: bool = False) -> list[tuple[str, int, list[str]]]:
    """The runs on ``network``: calm (no failures), or ``struck`` by its ``KILLS`` on the wall clock."""
    out, n = [], NETWORKS.index(network)
    scale = [f"network.link_scale={geo_scale:g}"] if network == "geo_distributed" else []
    for seed in range(seeds):
        for label in strategies:
            index = (seed * len(NETWORKS) + n) * 10 + list(STRATEGIES).index(label) + (STRUCK_AT if struck else 0)
            out.append(("clock_check", index, [*STRATEGIES[label], f"network={network}", *scale, f"seed={seed}"]))
    return out


def pairs(records: list[dict]) -> list[dict]:
    """Each compared iteration: the wall seconds and the simulated seconds since the record before, and whether
    the clock charged upkeep in it. Left out: the warm-up, a record with a validation (its time is the eval's
    too) and any iteration that lost a stage."""
    out = []
    for before, now in zip(records, records[1:]):
        # A record's wall time is taken before its validation runs: the validation's seconds are in the next one's.
        if now["iteration"] <= WARM_UP or "val_loss" in before or now.get("failed_stages"):
            continue
        out.append({"measured_s": now["wall_time_s"] - before["wall_time_s"],
                    "predicted_s": now["sim_time_s"] - before["sim_time_s"],
                    "upkeep": (now.get("overhead_sim_s") or 0.0) > 0})
    return out


def losses(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each recovery's real seconds against the clock's price of it, and each iteration that lost a stage (the
    work lost, the recovery, the step redone) against the simulated seconds the clock added for it."""
    recoveries, struck = [], []
    for before, now in zip(records, records[1:]):
        if not now.get("failed_stages") or "val_loss" in before:
            continue
        if now.get("recovery_wall_s"):
            recoveries.append({"measured_s": now["recovery_wall_s"], "predicted_s": now["recovery_price_s"]})
        struck.append({"measured_s": now["wall_time_s"] - before["wall_time_s"],
                       "predicted_s": now["sim_time_s"] - before["sim_time_s"]})
    return recoveries, struck


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
        timings = read_metrics(Path(r["run_dir"]) / TIMINGS)
        compared = pairs(timings)
        plain, upkeep = errors([x for x in compared if not x["upkeep"]]), errors([x for x in compared if x["upkeep"]])
        recoveries, struck = losses(timings)
        rows.append({"strategy": r["strategy"], "network": r["config"]["network"]["name"],
                     "link_scale": r["config"]["network"]["link_scale"],
                     "table": r["config"]["network"].get("table"), "seed": r["seed"],
                     "compute_time": r["config"]["engine"].get("compute_time", "wall"),
                     "struck": r["config"]["failure"]["name"] == "trace",
                     "kills": len([k for k in r.get("wall_failures", []) if k["pid"] is not None])
                     if r["config"]["engine"]["failure_clock"] == "wall" else len(r.get("recoveries", [])),
                     **{f"iteration_{k}": v for k, v in plain.items()}, **{f"upkeep_{k}": v for k, v in upkeep.items()},
                     **{f"recovery_{k}": v for k, v in errors(recoveries).items()},
                     **{f"loss_{k}": v for k, v in errors(struck).items()},
                     "total_error": errors(compared + struck)["error"], "wall_s": r.get("total_wall_time_s"),
                     "machine": (r.get("environment") or {}).get("machine", "not recorded")})
    return pd.DataFrame(rows)


def ranking(frame: pd.DataFrame, column: str) -> list[str]:
    """The strategies from the fastest to the slowest by ``column`` (mean over seeds)."""
    return list(frame.groupby("strategy")[column].mean().sort_values().index)


def mean(rows: pd.DataFrame, column: str, spec: str) -> str:
    return f"{rows[column].mean():{spec}}" if rows[column].notna().any() else "—"


CALM_COLUMNS = [("iteration measured (s)", "iteration_measured_s", ".3f"),
                ("predicted (s)", "iteration_predicted_s", ".3f"), ("error", "iteration_error", "+.1%"),
                ("MAPE", "iteration_mape", ".1%"), ("upkeep iterations measured (s)", "upkeep_measured_s", ".3f"),
                ("predicted (s)", "upkeep_predicted_s", ".3f"), ("error", "upkeep_error", "+.1%")]
STRUCK_COLUMNS = [("recovery measured (s)", "recovery_measured_s", ".2f"),
                  ("predicted (s)", "recovery_predicted_s", ".2f"), ("error", "recovery_error", "+.1%"),
                  ("iteration with the loss measured (s)", "loss_measured_s", ".2f"),
                  ("predicted (s)", "loss_predicted_s", ".2f"), ("error", "loss_error", "+.1%"),
                  ("whole run's error", "total_error", "+.1%")]
"""Each table's columns after network, strategy and seeds: (header, column of ``records_of``, format of its mean)."""


def table(runs: pd.DataFrame, columns: list[tuple[str, str, str]], losses: bool = False) -> list[str]:
    """One row per (network, strategy): how many seeds (and with ``losses`` how many kills landed), then the mean
    over seeds of each column."""
    headers = ["network", "strategy", "seeds", *(["losses"] if losses else []), *(h for h, _, _ in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for network, strategy, mine in groups(runs):
        cells = [network, strategy, str(len(mine)), *([str(mine.kills.sum())] if losses else []),
                 *(mean(mine, column, spec) for _, column, spec in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdicts(runs: pd.DataFrame, what: str, column: str, part: str, largest: bool = False) -> list[str]:
    """Per network: the mean absolute ``column`` over its runs (and the largest), and whether the clock ranks the
    strategies as the measurements do (``same_ranking`` of ``part``)."""
    lines = []
    for network in NETWORKS:
        here = runs[runs.network == network]
        if not here.empty:
            worst = f" (largest {here[column].abs().max():.1%})" if largest else ""
            lines += [f"{network}{scaled(here)}{what} {here[column].abs().mean():.1%} over {len(here)} runs{worst}; "
                      f"{same_ranking(here, part)}", ""]
    return lines


def report(frame: pd.DataFrame, out: Path, minutes: float | None, environment: str) -> str:
    calm, struck = frame[~frame.struck], frame[frame.struck]
    lines = ["Without failures:", "", *table(calm, CALM_COLUMNS), "",
             *verdicts(calm, ": mean absolute error of the iteration's price", "iteration_error", "iteration",
                       largest=True)]
    if not struck.empty:
        core = on_cores(struck)
        lines += [("With losses in simulated time, a core a stage (`CORE_LOSSES`, replacements 1 s of the processes' "
                   "time later):" if core else
                   "With losses on the wall clock (each network's `KILLS`, replacements 1 s later):"), "",
                  *table(struck, STRUCK_COLUMNS, losses=True), "",
                  *verdicts(struck, ", struck: mean absolute error of the whole run's time", "total_error", "total")]
    text = "\n".join(lines) + (
        "Per run: every iteration after the first two whose record has no validation, its wall seconds since the "
        "record before (measured: the process engine, every byte shaped to its link) against the simulated seconds "
        "the run's clock added (predicted: the cost model at the FLOP/s this machine reaches on the model); error = (predicted - "
        "measured) / measured of the means; MAPE = the iterations' mean absolute percentage error. Upkeep "
        "iterations: those the clock charged a checkpoint or a copy in. A recovery: its real seconds (detection, "
        "the replacement's delay, its start, the rendezvous, the transfers) against the clock's price of the recovery "
        "alone (its delay and transfers; the step it interrupted is the iteration's); the "
        "iteration with the loss: the step lost, the recovery and the step redone, against what the clock added for "
        "that iteration. The whole run's error: all its compared iterations, losses included (the runs are too short "
        "to reach a target: this is their time). Mean over seeds. Each run profiles the FLOP/s at its start "
        "(`network.device=profiled`): strategies whose iterations the clock prices alike are ranked by that "
        "measurement's noise as much as by their own. "
        + ("Runs on a core a stage (`engine.compute_time=cpu`): their measured seconds, and their run-minutes, are "
           "the stage processes' core clocks' (CPU seconds, waits jumped over), not the wall's, and so is their "
           "profile; a recovery there is the replacement's delay passed in those clocks, the rendezvous and the "
           "transfers (its detection and the new process's start are not counted). " if on_cores(frame) else "")
        + (f"Wall time of this invocation {minutes:.1f} min; " if minutes is not None else "Written from the runs there; ")
        + f"{frame.wall_s.fillna(0).sum() / 60:.1f} run-minutes in all.\n" + (f"\n{environment}\n" if environment else ""))
    (out / "clock_check.md").write_text(text)
    return text


def groups(frame: pd.DataFrame):
    """(network, strategy, its runs) in the order of NETWORKS and STRATEGIES."""
    for network in NETWORKS:
        here = frame[frame.network == network]
        for strategy in (s for s in STRATEGIES if s in set(here.strategy)):
            yield network, strategy, here[here.strategy == strategy]


def on_cores(runs: pd.DataFrame) -> bool:
    """Whether these runs kept the stage processes' core clocks (``--compute-time cpu``; an ``--out`` holds one
    kind only: ``times_of``)."""
    return "compute_time" in runs and (runs.compute_time == "cpu").any()


def scaled(runs: pd.DataFrame) -> str:
    """How the network's links were given, where not as the preset has them."""
    scale, table = runs.link_scale.iloc[0], runs.table.iloc[0] if "table" in runs else None
    notes = ([f"links from {Path(table).name}"] if isinstance(table, str) else []) + \
        ([f"links x {scale:g} slower"] if scale != 1 else []) + \
        (["a core a stage"] if on_cores(runs) else [])
    return f" ({', '.join(notes)})" if notes else ""


def same_ranking(runs: pd.DataFrame, part: str) -> str:
    """Whether the clock orders the strategies as the measurements do, by the mean seconds of ``part``'s
    iterations (``iteration``: the plain ones; ``total``: every compared one, losses included)."""
    if part == "total":
        parts = ("iteration", "upkeep", "loss")
        runs = runs.assign(**{side: sum(runs[f"{p}_{side}_s"].fillna(0) * runs[f"{p}_n"] for p in parts)
                              for side in ("measured", "predicted")})
    else:
        runs = runs.assign(measured=runs.iteration_measured_s, predicted=runs.iteration_predicted_s)
    runs, apart = one_machine(runs)
    measured, predicted = ranking(runs, "measured"), ranking(runs, "predicted")
    verdict = "the same ranking" if measured == predicted else "not the same ranking"
    resolved, alike = resolved_pairs(runs)
    return (f"strategies by measured time {', '.join(measured)}; by predicted {', '.join(predicted)} ({verdict}); "
            f"of the {len(resolved)} pairs of strategies whose measured means differ by more than the larger of "
            f"their spreads over 2 or more seeds, the clock orders {alike} alike"
            + (" (the rest differ by less than the seeds do)." if len(resolved) < math.comb(len(measured), 2) else ".")
            + apart)


def one_machine(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs a ranking may compare: measured seconds are their machine's, so only the strategies whose runs were
    all made on the machine most runs were made on (a run made before summaries named it counts as one more
    machine); and a sentence naming the rest, if any."""
    if "machine" not in runs or runs.machine.nunique() < 2:
        return runs, ""
    counts = runs.machine.value_counts()
    common = min(counts.index, key=lambda m: (-counts[m], m))  # a tie goes to the first name, not to chance
    elsewhere = sorted(set(runs.strategy[runs.machine != common]))
    where = "made before summaries named their machine" if common == "not recorded" else f"on {common}"
    return runs[~runs.strategy.isin(elsewhere)], (
        f" Not ranked: {', '.join(elsewhere)}, whose runs were made on another machine than the rest's ({where}): "
        "times compare on one machine only.")


def resolved_pairs(runs: pd.DataFrame) -> tuple[list[tuple[str, str]], int]:
    """The pairs of strategies the runs can order -- their mean ``measured`` seconds differ by more than the larger
    of the two strategies' spreads (largest minus smallest) over their seeds -- and how many of those the mean
    ``predicted`` seconds order the same way. Strategies whose measured times differ by less than the seeds do
    have no ranking to check."""
    by = runs.groupby("strategy")
    mean, spread, price = by.measured.mean(), by.measured.max() - by.measured.min(), by.predicted.mean()
    seeds = by.measured.count()
    names = list(mean.index)
    # One seed has no spread to measure the noise by: its pairs are not resolved, however far apart.
    resolved = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                if min(seeds[a], seeds[b]) >= 2 and abs(mean[a] - mean[b]) > max(spread[a], spread[b])]
    # A tie in price orders nothing: not alike.
    alike = sum(price[a] != price[b] and (mean[a] < mean[b]) == (price[a] < price[b]) for a, b in resolved)
    return resolved, alike


TABLE_MARK = "table.json"
"""In an ``--out`` whose geo runs took their links from ``--table``: the file and its sha256, so that no invocation
mixes two tables' runs (or the reference's) in one report."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def links_of(table: Path | None, out: Path) -> list[str]:
    """The geo runs' overrides for ``--table`` (none for the reference's table), after refusing a bad table file,
    the default ``--out`` (the reference table's runs) and an ``--out`` whose runs used other links."""
    mark = out / TABLE_MARK
    try:
        before = json.loads(mark.read_text())["sha256"] if mark.is_file() else None
    except (ValueError, KeyError, TypeError):
        refuse("--out", out, f"its {mark.name} is not the file this script writes (JSON with the table's sha256); "
                             "allowed: an --out without it, or with the one the script wrote")
    if table is None:
        if before is not None:
            refuse("--table", None, f"{out} holds runs on the links of {mark.name}'s table; allowed: that --table, "
                                    "or another --out")
        return []
    from checkfree.run.config import ConfigError
    from checkfree.simulation.networks import read_table

    try:
        read_table(str(table.resolve()))
    except ConfigError as e:
        refuse("--table", table, str(e).split(" is invalid: ", 1)[-1].rstrip("."))
    if out == (ROOT / "results" / "clock_check").resolve():
        refuse("--table", table, "its runs need an --out of their own (results/clock_check holds the reference "
                                 "table's)")
    # Runs that completed on other links (an attempt that completed none may be made again on a mended table).
    held = (out / ARCHIVE).is_file() or any('"completed"' in p.read_text() for p in (out / "runs").rglob("summary.json"))
    if before != sha256(table) and held:
        refuse("--table", table, f"{out} holds runs on other links; allowed: another --out")
    return [f"network.table={table.resolve()}"]


def times_of(compute_time: str, out: Path) -> list[str]:
    """Every run's override for ``--compute-time``, after refusing an ``--out`` whose runs kept the other time (or
    the default one, the wall-clock runs')."""
    if compute_time not in ("wall", "cpu"):
        refuse("--compute-time", compute_time, "allowed is wall or cpu (engine.compute_time)")
    if compute_time == "cpu" and out == (ROOT / "results" / "clock_check").resolve():
        refuse("--compute-time", compute_time, "its runs need an --out of their own (results/clock_check holds the "
                                               "wall-clock runs)")
    summaries = [json.loads(p.read_text()) for p in (out / "runs").rglob("summary.json")]
    kept = {s.get("config", {}).get("engine", {}).get("compute_time", "wall") for s in summaries
            if s.get("status") == "completed"}
    if kept - {compute_time}:
        refuse("--compute-time", compute_time, f"{out} holds runs timed by {', '.join(sorted(kept))}; allowed: that, "
                                               "or another --out")
    # A core clock counts CPU seconds: the stages compute on the CPU, wherever a GPU is present.
    return ["engine.compute_time=cpu", "trainer.device=cpu"] if compute_time == "cpu" else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "clock_check")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--geo-scale", type=float, default=1.0, help="network.link_scale of the geo network's runs")
    parser.add_argument("--table", type=Path, default=None,
                        help="the geo network's links from this CSV (network.table: site_a,site_b,latency_ms,"
                             "bandwidth_Mbps) instead of the reference's table; use another --out")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of " + ", ".join(STRATEGIES))
    parser.add_argument("--struck", action="store_true",
                        help="also run every point struck by its network's KILLS on the wall clock")
    parser.add_argument("--compute-time", default="wall",
                        help="engine.compute_time of every run: wall, or cpu (each stage process on its own core's "
                             "clock: what one cluster needs on a machine with fewer cores than stages); use another "
                             "--out")
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
    links = links_of(args.table, out) if not args.report_only else []
    timed = times_of(args.compute_time, out) if not args.report_only else []
    out.mkdir(parents=True, exist_ok=True)
    if args.table is not None and not args.report_only:
        (out / TABLE_MARK).write_text(json.dumps({"table": str(args.table.resolve()),
                                                  "sha256": sha256(args.table)}, indent=1) + "\n")
    with archived(out):
        if args.report_only:
            runs = [{**json.loads(p.read_text()), "run_dir": str(p.parent)}
                    for p in sorted((out / "runs" / "clock_check").glob("*/summary.json"))]
        else:
            geo = {"geo_distributed": links}
            # A table changes the geo network's links alone: one cluster's runs would be the reference's again.
            networks = ["geo_distributed"] if args.table is not None else list(NETWORKS)
            groups_ = [(points(strategies, args.seeds, args.geo_scale, network), out / "runs",
                        [*geo.get(network, []), *timed]) for network in networks]
            if args.struck:
                for network in networks:
                    if timed:  # a core a stage: the losses in simulated time, the delay in the processes' time
                        trace, struck = out / f"losses_{network}.json", [DELAY]
                        trace.write_text(json.dumps(CORE_LOSSES, indent=1) + "\n")
                    else:
                        trace, struck = out / f"kills_{network}.json", STRUCK
                        trace.write_text(json.dumps(KILLS[network], indent=1) + "\n")
                    groups_.append((points(strategies, args.seeds, args.geo_scale, network, struck=True), out / "runs",
                                    [*struck, "failure=trace", f"failure.path={trace}", *geo.get(network, []),
                                     *timed]))
            runs = [run for group in run_groups(groups_, jobs=1) for run in group]
            for r in runs:  # a run made now: its timings anew (an earlier failed attempt's may be there)
                if r["run_dir"] in RAN or not (Path(r["run_dir"]) / TIMINGS).is_file():
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
