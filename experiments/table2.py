"""The paper's Table 2 (and its Fig. 2 ablation) at CPU scale, in the paper's own units, with one command.

``main`` (the default):

1. **Calibration** — the sweep's setup (``conf/sweep/table2.yaml``) with ``strategy=none failure=none``,
   ``--seeds`` seeds, each trained until it reaches the target: ``T`` = the mean of their iterations to the
   target (interpolated between validations). ``T`` fixes the regime, before any failure is drawn: every CPU
   iteration stands for 10,000 / T paper iterations (``trainer.clock=paper_table2``), so Poisson failures at
   the paper's hourly rates strike as often per ``T`` as in the paper, and checkpoints are taken every
   ``T / 100`` iterations, as the paper's every 100 of its 10,000.
2. **The grid** — checkpointing, redundant computation, CheckFree and CheckFree+ at 5 / 10 / 16 %/h, each
   seed, each run stopped at the target or after ``--cap`` x T iterations.
3. **The table** — ``checkfree.table2`` writes ``comparison.csv``, ``comparison.md`` and the loss-vs-hours
   plot into ``--out``.

``ablations``: the same regime at 16 %/h for the rebuild rules (checkfree, uniform, copy, random, zero), at
each of ``--widths`` (d_model; same depth, heads of 16 dimensions), each width calibrated on its own T and
trained to 1.25 T; ``ablations.md`` gives the validation loss at T and at the end, and the time to target.

Points run as separate processes (one torch thread each), ``--jobs`` at a time; a finished point is not run
again, so an interrupted sweep resumes where it stopped.

    python experiments/table2.py [--out results/table2] [--seeds 3] [--jobs 2] [--rates 0.16] [--widths 128]
    python experiments/table2.py ablations [--widths 64,128] [--out results/table2_ablations]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pandas as pd  # noqa: E402
from sweep import ROOT, grid, run_point  # noqa: E402  (the sibling script: one way of running a point)

from checkfree.recovery import strategy_class  # noqa: E402
from checkfree.table2 import ci95, write_report  # noqa: E402

CAP = 4.0
"""A run that has not reached the target after CAP x T iterations stops (and counts as not reached)."""
ABLATION_LENGTH = 1.25
"""Ablation runs train to 1.25 T: the validation loss is compared at T (as the paper's Fig. 2) and at the end."""


def run_all(points: list[tuple[str, int, list[str]]], out: Path, extra: list[str], jobs: int) -> list[dict]:
    """Run every (sweep, index, overrides) point; returns each run's summary (or its failure)."""
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_point, name, i, overrides, out, read_by(overrides, extra))
                   for name, i, overrides in points]
        for done, future in enumerate(futures, 1):
            run_dir, code, seconds = future.result()
            print(f"[{done}/{len(points)}] {Path(run_dir).name}: {'ok' if code == 0 else f'FAILED (exit {code})'} "
                  f"in {seconds:.0f} s", flush=True)
            summary = Path(run_dir) / "summary.json"
            # run_dir: where the run is now (its summary names where it ran, maybe another clone's path).
            results.append({**json.loads(summary.read_text()), "run_dir": run_dir} if summary.exists()
                           else {"run_dir": run_dir})
    return results


def read_by(overrides: list[str], extra: list[str]) -> list[str]:
    """``extra`` without the ``strategy.*`` keys that the point's strategy does not read (a run refuses them):
    ``regime`` gives every point checkpointing's ``strategy.every``."""
    name = next((o.split("=", 1)[1] for o in [*overrides, *extra] if o.startswith("strategy=")), None)
    if name is None:
        return extra
    reads = strategy_class(name).reads
    return [o for o in extra if not (o.lstrip("+").startswith("strategy.")
                                     and o.lstrip("+").split("=", 1)[0].split(".", 1)[1] not in reads)]


def calibrate(out: Path, seeds: int, jobs: int, extra: list[str]) -> dict:
    """T: the mean iterations to target of ``seeds`` no-failure runs of the table2 setup."""
    points = [("table2", i, ["strategy=none", "failure.name=none", "failure.hourly_rate=0.0", f"seed={s}"])
              for i, s in enumerate(range(seeds))]
    # A generous cap: the calibration finds T, it must not be cut short by a guess of it.
    runs = run_all(points, out / "calibration", ["trainer.clock=fixed", "trainer.iterations=5000", *extra], jobs)
    iterations = [r.get("iterations_to_target_interp") for r in runs]
    if any(i is None for i in iterations):
        raise SystemExit(f"a calibration run did not reach the target: {iterations}; see {out / 'calibration'}")
    target = runs[0]["target_loss"]
    T = round(statistics.fmean(iterations))
    calibration = {"T": T, "target": target, "iterations": iterations, "ci95": ci95(iterations),
                   "val_loss_se": [r.get("final_val_loss_se") for r in runs], "seeds": seeds,
                   "run_seconds": run_seconds(runs),
                   # Each seed's environment: the report flags grid runs made in another.
                   "environments": [r.get("environment") for r in runs]}
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    print(f"calibration: T = {T} iterations to {target} (per seed {[round(i) for i in iterations]})", flush=True)
    return calibration


PROBE_ITERATIONS = 2000
"""The probe (one no-failure run) trains this long: its curve fixes the targets of a new corpus."""
GRANULARITY = (20, 10, 5)
"""Paper iterations per CPU iteration in the granularity study: targets the probe reaches after 10,000 / K."""
GRANULARITY_CAP = 3.5
"""The granularity study's runs stop after 3.5 T (the paper's slowest, checkpointing at 16 %, needed 2.84 T at
its own granularity): at K = 5 a run of 4 T would be 8,000 iterations."""


def probe_dir(args: argparse.Namespace) -> Path:
    """One probe per corpus (and overrides), shared by the table, the ablations and the granularity study."""
    label = "_".join([args.data or "synthetic", *(o.replace("=", "-") for o in args.set)])
    return ROOT / "results" / "probes" / label


def probe(out: Path, extra: list[str], iterations: int = PROBE_ITERATIONS) -> list[tuple[int, float]]:
    """The validation curve [(iteration, loss)] of one no-failure run (seed 0) of PROBE_ITERATIONS.

    A new corpus has no target yet: the probe fixes it from a no-failure run alone, before any failure is
    drawn — the loss it reaches after 500 iterations puts the corpus in the same regime as the synthetic one
    (T ~ 500, 20 paper iterations per CPU iteration), and the losses after 1,000 and 2,000 give the
    granularity study its finer clocks (K = 10, 5)."""
    from checkfree.runlog import read_metrics

    longer = [int(p.name.removeprefix("probe")) for p in out.glob("probe*") if p.name[5:].isdigit()
              and int(p.name[5:]) >= iterations and (p / "table2").is_dir()]
    if longer:  # a longer probe of the same corpus has the same curve (seed 0, no failures) as far as it goes
        out, iterations = out / f"probe{min(longer)}", min(longer)
    else:
        out = out / f"probe{iterations}"
    point = [("table2", 0, ["strategy=none", "failure.name=none", "failure.hourly_rate=0.0", "seed=0"])]
    [run] = run_all(point, out, ["trainer.clock=fixed", f"trainer.iterations={iterations}",
                                 "trainer.target_loss=null", "trainer.stop_at_target=false", *extra], 1)
    if run.get("status") != "completed":
        raise SystemExit(f"the probe run did not complete; see {out}")
    [metrics] = out.glob("table2/*/metrics.jsonl")  # where run_point put it (the summary's run_dir may be stale)
    return [(m["iteration"], m["val_loss"]) for m in read_metrics(metrics) if "val_loss" in m]


def target_at(curve: list[tuple[int, float]], iterations: float) -> float:
    """The probe's validation loss after ``iterations``, rounded to 3 decimals (a target one can write down)."""
    return round(interpolate(curve, iterations), 3)


def corpus_overrides(args: argparse.Namespace) -> list[str]:
    """``data=<corpus>`` and its target: given (--target), or fixed by the probe (--target auto)."""
    extra = [f"data={args.data}"] if args.data else []
    if args.target == "auto":
        # 1.2 x 500 iterations: enough to read the loss at 500 (the validations come every 50).
        target = target_at(probe(probe_dir(args), [*extra, *args.set], 600), 10_000 / GRANULARITY[0])
        print(f"target {target}: the probe's validation loss after {10_000 // GRANULARITY[0]} iterations", flush=True)
        extra.append(f"trainer.target_loss={target}")
    elif args.target is not None:
        extra.append(f"trainer.target_loss={float(args.target)}")
    return [*extra, *args.set]


def model_width(width: int) -> list[str]:
    """The overrides of a model ``width`` wide (d_model): the same depth, heads of 16 dimensions."""
    return [f"model.d_model={width}", f"model.n_heads={max(1, width // 16)}"]


def regime(T: int, length: float) -> list[str]:
    """The overrides that put a run in the paper's regime for calibrated T: checkpoints (and snapshots) every
    T / 100 iterations, as the paper's every 100 of its 10,000, and memory_checkpoint's fall-back to storage
    as often as the checkpointing baseline saves (paying for those saves: ``Clock.upkeep_seconds``). Its
    default, every 500 iterations (~T here), would roll a lost stage that took its snapshot's holder with it
    back to the start of the run: no Gemini-style system keeps its storage checkpoint a whole run stale."""
    period = max(1, round(T / 100))
    return [f"trainer.paper_T={T}", f"++strategy.every={period}", f"++strategy.storage_every={period}",
            f"trainer.iterations={math.ceil(length * T)}"]


def main_table(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.widths is not None and not args.widths.isdigit():  # before the probe or any run
        raise SystemExit(f"--widths={args.widths} is invalid for the main table: one d_model (e.g. 128) at a time, "
                         "each into its own --out (the ablations take several)")
    extra = corpus_overrides(args)
    if args.widths is not None:  # another width: the same target, its own calibrated T
        extra = [*model_width(int(args.widths)), *extra]
    calibration = calibrate(args.out, args.seeds, args.jobs, extra)
    strategies = args.strategies.split(",") if args.strategies else None
    points = [("table2", i, o) for i, o in enumerate(grid("table2")) if int(o[-1].split("=")[1]) < args.seeds
              and o[1].split("=")[1] in args.rates.split(",")
              and (strategies is None or o[0].split("=")[1] in strategies)]
    run_all(points, args.out / "runs", [*regime(calibration["T"], CAP), *extra], args.jobs)
    if "0.16" in args.rates.split(",") and (strategies is None or "checkfree" in strategies):
        edge_protocols(args, calibration, extra)
    table = write_report([args.out / "runs"], args.out, calibration)
    minutes = (time.perf_counter() - start) / 60
    print((args.out / "comparison.md").read_text())
    print(f"{len(table)} rows; sweep wall time {minutes:.1f} min (calibration included)")
    (args.out / "wall_time.txt").write_text(f"{minutes:.1f} min on {args.jobs} jobs, calibration included\n")


def edge_protocols(args: argparse.Namespace, calibration: dict, extra: list[str]) -> None:
    """Plain CheckFree under the paper's own protocol too: at 16 %/h, failures on intermediate stages only (its
    Fig. 2: the (de)embedding holders never fail), beside the table's protocol (every stage fails, a lost edge
    is copied from its neighbour, ``strategy.edge_rule=copy``) and CheckFree+ (which exists because plain
    CheckFree cannot rebuild an edge). Written to ``protocols.md``."""
    points = [("table2", i, ["strategy=checkfree", "failure.hourly_rate=0.16", f"seed={seed}"])
              for i, seed in enumerate(range(args.seeds))]
    intermediate = run_all(points, args.out / "runs_intermediate",
                           [*regime(calibration["T"], CAP), "failure.stages=intermediate", *extra], args.jobs)
    T, table = calibration["T"], []
    main_runs = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*/*/summary.json"))]
    for label, runs in (("CheckFree, every stage fails, edges copied (the table's row)",
                         [r for r in main_runs if r.get("strategy") == "checkfree" and r.get("hourly_rate") == 0.16]),
                        ("CheckFree, intermediate stages fail only (the paper's Fig. 2 protocol)", intermediate),
                        ("CheckFree+, every stage fails (the table's row)",
                         [r for r in main_runs if r.get("strategy") == "checkfree_plus" and r.get("hourly_rate") == 0.16])):
        its = [r["iterations_to_target_interp"] / T for r in runs if r.get("iterations_to_target_interp") is not None]
        hours = [r["time_to_target_interp_s"] / 3600 for r in runs if r.get("time_to_target_interp_s") is not None]
        failures = [r["n_failures"] for r in runs if "n_failures" in r]
        table.append(f"| {label} | {fmt(its, '.2f') if its else '—'} | {fmt(hours, '.0f') if hours else '—'} | "
                     f"{fmt(failures, '.0f') if failures else '—'} | {len(its)}/{len(runs)} |")
    text = "\n".join(["| protocol at 16 %/h | iterations to target / T | hours to target | failures | reached |",
                      "|---|---|---|---|---|", *table]) + "\n"
    (args.out / "protocols.md").write_text(text)
    print(text)


def ablations(args: argparse.Namespace) -> None:
    start, lines, records, seconds = time.perf_counter(), [], [], 0.0
    extra = corpus_overrides(args)  # one target for every width, as the paper's one target for its rules
    for width in [int(w) for w in (args.widths or "64,128").split(",")]:
        shape = model_width(width)
        out = args.out / f"d{width}"
        calibration = calibrate(out, args.seeds, args.jobs, [*shape, *extra])
        points = [("table2_ablations", i, o) for i, o in enumerate(grid("table2_ablations"))
                  if int(o[-1].split("=")[1]) < args.seeds]
        runs = run_all(points, out / "runs", [*regime(calibration["T"], ABLATION_LENGTH), *shape, *extra],
                       args.jobs)
        rows, per_run = ablation_rows(width, calibration, runs)
        lines, records = lines + rows, records + per_run
        seconds += calibration["run_seconds"] + run_seconds(runs)
    table = ["| d_model | T | rule | failures | val loss at T | val loss at 1.25 T | minus CheckFree's at 1.25 T "
             "(paired) | reached target | iterations to target / T |",
             "|---|---|---|---|---|---|---|---|---|", *lines]
    # A resumed sweep skips finished points: the runs' own wall times are the measure that survives that.
    text = "\n".join(table) + (
        f"\n\nMean ± 95 % CI over seeds (a seed draws the same failures for every rule, so the difference to "
        f"CheckFree is paired by seed); 16 %/h in paper units. Compute: {seconds / 60:.1f} run-minutes "
        f"(calibration included, {args.jobs} at a time); this invocation {(time.perf_counter() - start) / 60:.1f} "
        "min of wall time.\n")
    (args.out / "ablations.md").write_text(text)
    # Per run, what the table averages (git keeps only each run directory's summary and kept metrics rows).
    pd.DataFrame(records).to_csv(args.out / "runs.csv", index=False)
    print(text)


def granularity(args: argparse.Namespace) -> None:
    """The same strategies at 16 %/h with one CPU iteration standing for K = 20, 10 and 5 paper iterations:
    each K has its own target (the probe's loss after 10,000 / K iterations) and its own T (the probe's
    iterations to it), so a finer clock is a longer run towards a lower loss. Iterations to target / T should
    not depend on K if the clock is honest at the coarsest one."""
    start = time.perf_counter()
    extra = [f"data={args.data}"] if args.data else []
    curve = probe(probe_dir(args), [*extra, *args.set])
    strategies = (args.strategies or "checkpoint,redundant,checkfree,checkfree_plus").split(",")
    points, regimes = [], {}
    for K in GRANULARITY:
        target = target_at(curve, 10_000 // K)
        T = round(first_crossing(curve, target))  # the probe's own (interpolated) iterations to that target
        regimes[K] = (T, target)
        points += [(K, name, seed, [f"strategy={name}", "failure.hourly_rate=0.16", f"seed={seed}",
                                    f"trainer.target_loss={target}", *regime(T, GRANULARITY_CAP)])
                   for name in strategies for seed in range(args.seeds)]
    # All points at once, the finest clock (the longest runs) first, so that no core waits for a K to finish;
    # a point's index (its run directory) does not depend on which --granularities this invocation runs.
    points.sort(key=lambda p: p[0])
    wanted = {int(k) for k in args.granularities.split(",")}
    indexed = [("table2", i, o) for i, (K, _, _, o) in enumerate(points) if K in wanted or args.report_only]
    points = [p for p in points if p[0] in wanted or args.report_only]
    runs = (so_far(indexed, args.out / "runs") if args.report_only
            else run_all(indexed, args.out / "runs", [*extra, *args.set], args.jobs))
    records = []
    for (K, _, _, _), r in zip(points, runs):
        T, target = regimes[K]
        reached = r.get("iterations_to_target_interp")
        if r.get("status") != "completed" and reached is None:  # still running (or not started): a lower bound
            reached_by = math.nan if r.get("not_started") else r.get("iterations_so_far", 0) / T
            records.append({"K": K, "T": T, "target": target, "strategy": r.get("strategy"), "seed": r.get("seed"),
                            "unfinished_beyond_T": reached_by, "not_started": bool(r.get("not_started")),
                            "wall_s": r.get("total_wall_time_s")})
            continue
        records.append({"K": K, "paper_iterations_per_cpu_iteration": 10_000 / T, "T": T, "target": target,
                        "strategy": r.get("strategy"), "seed": r.get("seed"), "failures": r.get("n_failures"),
                        "iterations_to_target_over_T": reached / T if reached is not None else None,
                        "hours_to_target": (r["time_to_target_interp_s"] / 3600
                                            if r.get("time_to_target_interp_s") is not None else None),
                        "lost_work_h": (r.get("lost_work_sim_s") or 0.0) / 3600,
                        "wall_s": r.get("total_wall_time_s")})
    rows = []
    frame = pd.DataFrame(records)
    for column in ("iterations_to_target_over_T", "unfinished_beyond_T", "not_started"):  # absent when no run
        if column not in frame:                                                           # got that far
            frame[column] = math.nan
    frame.to_csv(args.out / "granularity.csv", index=False)
    for name in strategies:
        cells = []
        for K in GRANULARITY:
            mine = frame[(frame.strategy == name) & (frame.K == K)]
            values = [v for v in mine.iterations_to_target_over_T if v is not None and v == v]
            unfinished = [v for v in mine.unfinished_beyond_T if v == v]
            if unfinished:  # --report-only while runs go on: how far they got without reaching the target
                cells.append(f"> {min(unfinished):.2f} (unfinished)")
            elif len(mine) and mine.not_started.eq(True).all():  # NaN (a run that started) is not True
                cells.append("not run yet")
            else:
                cells.append(f"{fmt(values, '.2f')} ({len(values)}/{len(mine)})" if values
                             else f"> {GRANULARITY_CAP:g} (0/{len(mine)})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    Ts = sorted(set(frame["T"]), reverse=True)
    text = "\n".join([
        "| strategy | " + " | ".join(f"K = {10_000 / T:.1f} (T = {T})" for T in sorted(Ts)) + " |",
        "|---|" + "---|" * len(Ts), *rows]) + (
        f"\n\nIterations to target / T at 16 %/h (mean ± 95 % CI over {args.seeds} seed(s); in brackets the runs that "
        f"reached the target within {GRANULARITY_CAP:g} T). K: paper iterations per CPU iteration. This invocation "
        f"{(time.perf_counter() - start) / 60:.1f} min of wall time; {run_seconds(records_as_runs(records)) / 60:.1f} "
        "run-minutes.\n")
    (args.out / "granularity.md").write_text(text)
    plot_granularity(frame, args.out / "granularity.png")
    print(text)


def records_as_runs(records: list[dict]) -> list[dict]:
    return [{"total_wall_time_s": r.get("wall_s")} for r in records]


def so_far(points: list[tuple[str, int, list[str]]], out: Path) -> list[dict]:
    """Each point's summary as it stands, without running anything (``--report-only``): a run not finished
    yet also says how many iterations it has done (the last line of its metrics)."""
    from checkfree.runlog import run_metrics

    runs = []
    for name, i, overrides in points:
        matches = sorted((out / name).glob(f"{i:03d}_*/summary.json"))
        summary = json.loads(matches[0].read_text()) if matches else {"not_started": True}
        if summary.get("status") != "completed" and matches:
            records = run_metrics(matches[0].parent)
            summary["iterations_so_far"] = records[-1]["iteration"] if records else 0
        summary.setdefault("strategy", overrides[0].split("=", 1)[1])
        runs.append(summary)
    return runs


def first_crossing(curve: list[tuple[int, float]], target: float) -> float:
    """The first (interpolated) iteration at which the curve is at or below ``target``."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y1 <= target < y0:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    raise SystemExit(f"the probe never reaches {target}")


def plot_granularity(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in frame.groupby("strategy"):
        means = rows.groupby("K")["iterations_to_target_over_T"].mean().sort_index(ascending=False)
        ax.plot(means.index, means.values, marker="o", label=name)
    ax.set_xlabel("paper iterations per CPU iteration (K)")
    ax.set_ylabel("iterations to target / T")
    ax.invert_xaxis()
    ax.set_title("16 %/h: convergence as the CPU clock gets finer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seconds(runs: list[dict]) -> float:
    """The runs' own wall times, summed (a run that failed to start counts 0)."""
    return sum(r.get("total_wall_time_s") or 0.0 for r in runs)


def ablation_rows(width: int, calibration: dict, runs: list[dict]) -> tuple[list[str], list[dict]]:
    """The table's rows for one width, and every run's own figures (for runs.csv)."""
    from checkfree.runlog import run_metrics

    T, rows, records, finals = calibration["T"], [], [], {}
    for rule in ("checkfree", "uniform", "copy", "random", "zero"):
        mine = sorted((r for r in runs if r.get("strategy") == rule), key=lambda r: r["seed"])
        at_T, at_end, its = [], [], []
        for r in mine:
            curve = [(m["iteration"], m["val_loss"]) for m in run_metrics(Path(r["run_dir"]))
                     if "val_loss" in m]
            at_T.append(interpolate(curve, T))
            at_end.append(curve[-1][1])
            if r.get("iterations_to_target_interp") is not None:
                its.append(r["iterations_to_target_interp"] / T)
            records.append({"d_model": width, "T": T, "rule": rule, "seed": r["seed"], "failures": r["n_failures"],
                            "recoveries": r["n_recoveries"], "val_loss_at_T": at_T[-1],
                            "val_loss_at_end": at_end[-1], "iterations": r["iterations"],
                            "iterations_to_target": r.get("iterations_to_target_interp"),
                            "wall_s": r.get("total_wall_time_s")})
        finals[rule] = dict(zip((r["seed"] for r in mine), at_end))
        paired = [loss - finals["checkfree"][seed] for seed, loss in finals[rule].items()
                  if seed in finals["checkfree"]]
        rows.append(f"| {width} | {T} | {rule} | {fmt([r['n_failures'] for r in mine], '.0f')} | {fmt(at_T)} | "
                    f"{fmt(at_end)} | {fmt(paired, '+.4f') if rule != 'checkfree' else '—'} | "
                    f"{len(its)}/{len(mine)} | {fmt(its, '.2f') if its else '—'} |")
    return rows, records


def interpolate(curve: list[tuple[int, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def calibrated_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options of an experiment run in the calibrated Table 2 regime of a corpus (``crossover.py``,
    ``replacement.py``): its corpus and calibration, where the runs go, how many seeds and jobs."""
    parser.add_argument("--data", default="pydocs", help="corpus (a conf/data option)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json of experiments/table2.py on that corpus (T and target); default: "
                             "results/table2_<data>/calibration.json")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / out)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")


def calibration_file(args: argparse.Namespace) -> dict:
    """``args.data``'s calibration.json (T, target, the calibration runs' environments), or a one-line exit
    saying how to make it."""
    path = args.calibration or ROOT / "results" / f"table2_{args.data}" / "calibration.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run experiments/table2.py --data {args.data} --target auto "
                         "first (its calibration fixes T and the target), or pass --calibration")
    return json.loads(path.read_text())


def calibration_of(args: argparse.Namespace) -> tuple[int, float]:
    """(T, target) of ``args.data``'s calibration."""
    calibration = calibration_file(args)
    return calibration["T"], calibration["target"]


def runs_of(args: argparse.Namespace, out: Path, points: list[tuple[str, int, list[str]]],
            extra: list[str]) -> list[dict]:
    """Every point's summary: run now (resuming), or with ``--report-only`` read from the runs there are."""
    if args.report_only:
        return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/summary.json"))]
    return run_all(points, out / "runs", [*extra, *args.set], args.jobs)


def fmt(values: list[float], spec: str = ".4f") -> str:
    half = ci95(values)
    return f"{statistics.fmean(values):{spec}}" + (f" ± {half:{spec.lstrip('+')}}" if math.isfinite(half) else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="main", choices=("main", "ablations", "granularity"))
    parser.add_argument("--data", default=None, help="corpus (a conf/data option, e.g. pydocs); default: the "
                        "sweep's own (the embedded synthetic stories)")
    parser.add_argument("--target", default=None, help="main: 'auto' (fixed by a no-failure probe run) or a "
                        "validation loss; default: the sweep's own (0.82, for the synthetic stories)")
    parser.add_argument("--rates", default="0.05,0.10,0.16", help="main: the hourly rates of the grid")
    parser.add_argument("--strategies", default=None,
                        help="the strategies run (comma-separated); default: main, every one of the sweep's; "
                             "granularity, the paper's four")
    parser.add_argument("--granularities", default=",".join(map(str, GRANULARITY)),
                        help="granularity: run only these K (e.g. 20,10); the report covers every K")
    parser.add_argument("--report-only", action="store_true",
                        help="granularity: write the table from the runs as they stand, running nothing")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--widths", default=None, help="ablations: comma-separated d_model values (default "
                        "64,128); main: one d_model (default: the sweep's, 64), calibrated on its own")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    default = {"main": "table2", "ablations": "table2_ablations", "granularity": "granularity"}[args.what]
    args.out = (args.out or ROOT / "results" / default).resolve()
    {"main": main_table, "ablations": ablations, "granularity": granularity}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
