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
3. **The table** — ``checkfree.reports.table2`` writes ``comparison.csv``, ``comparison.md`` and the loss-vs-hours
   plot into ``--out``.

``ablations``: the same regime at 16 %/h for the rebuild rules (checkfree, uniform, copy, random, zero), at
each of ``--widths`` (d_model; same depth, heads of 16 dimensions), each width calibrated on its own T and
trained to 1.25 T; ``ablations.md`` gives the validation loss at T and at the end, and the time to target.

``granularity``: checkpointing, CheckFree, CheckFree+ and snapshot restore at 16 %/h with K (paper iterations
per CPU iteration) changed alone: the main table's target kept, each CPU iteration trained on 8, 4, 2 or 1
sequences per micro-batch (``--sizes``), each level calibrated on its own T; ``granularity.md`` gives time to
target / T per level and its least-squares extrapolation to the paper's K = 1.

Points run as separate processes (one torch thread each), ``--jobs`` at a time; a finished point is not run
again, so an interrupted sweep resumes where it stopped.

    python experiments/table2.py [--out results/table2] [--seeds 3] [--jobs 2] [--rates 0.16] [--widths 128]
    python experiments/table2.py ablations [--widths 64,128] [--out results/table2_ablations]
    python experiments/table2.py granularity --data pydocs [--sizes 8,4,2,1] [--out results/granularity_pydocs]
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
from checkfree.reports.table2 import T95, ci95, paper_iteration_seconds, write_report  # noqa: E402
from checkfree.run.provenance import describe  # noqa: E402
from checkfree.simulation.paper_table2 import PAPER_T, RATES  # noqa: E402
from checkfree.storage.archive import archived  # noqa: E402

CAP = 4.0
"""A run that has not reached the target after CAP x T iterations stops (and counts as not reached)."""
RATE_16 = RATES.index(0.16)
"""The column of the paper's Table 2 that the granularity study runs (16 %/h)."""
ABLATION_LENGTH = 1.25
"""Ablation runs train to 1.25 T: the validation loss is compared at T (as the paper's Fig. 2) and at the end."""


RAN: list[str] = []
"""The run directories this invocation trained (a point already completed is not run again)."""


def run_all(points: list[tuple[str, int, list[str]]], out: Path, extra: list[str], jobs: int) -> list[dict]:
    """Run every (sweep, index, overrides) point; returns each run's summary (or its failure)."""
    [runs] = run_groups([(points, out, extra)], jobs)
    return runs


def run_groups(groups: list[tuple[list[tuple[str, int, list[str]]], Path, list[str]]], jobs: int) -> list[list[dict]]:
    """Run the points of several groups (each its points, its directory, its overrides) in one pool, so that no
    core waits for one group to finish; returns each group's summaries, in its points' order."""
    results: list[list[dict]] = [[] for _ in groups]
    total = sum(len(points) for points, _, _ in groups)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(g, pool.submit(run_point, name, i, overrides, out, read_by(overrides, extra)))
                   for g, (points, out, extra) in enumerate(groups) for name, i, overrides in points]
        for done, (g, future) in enumerate(futures, 1):
            run_dir, code, seconds = future.result()
            if seconds > 0:
                RAN.append(run_dir)
            print(f"[{done}/{total}] {Path(run_dir).name}: {'ok' if code == 0 else f'FAILED (exit {code})'} "
                  f"in {seconds:.0f} s", flush=True)
            summary = Path(run_dir) / "summary.json"
            # run_dir: where the run is now (its summary names where it ran, maybe another clone's path).
            results[g].append({**json.loads(summary.read_text()), "run_dir": run_dir} if summary.exists()
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


CALIBRATION_POINTS = "strategy=none", "failure.name=none", "failure.hourly_rate=0.0"


def calibration_points(seeds: int) -> list[tuple[str, int, list[str]]]:
    """The no-failure runs that fix T: one per seed."""
    return [("table2", i, [*CALIBRATION_POINTS, f"seed={s}"]) for i, s in enumerate(range(seeds))]


def calibration_overrides(extra: list[str], iterations: int = 5000) -> list[str]:
    # A generous cap: the calibration finds T, it must not be cut short by a guess of it.
    return ["trainer.clock=fixed", f"trainer.iterations={iterations}", *extra]


def calibrate(out: Path, seeds: int, jobs: int, extra: list[str], iterations: int = 5000) -> dict:
    """T: the mean iterations to target of ``seeds`` no-failure runs of the table2 setup."""
    runs = run_all(calibration_points(seeds), out / "calibration", calibration_overrides(extra, iterations), jobs)
    return write_calibration(out, runs)


def write_calibration(out: Path, runs: list[dict]) -> dict:
    """``out/calibration.json`` from the no-failure runs: T (their mean iterations to target) and the target."""
    iterations = [r.get("iterations_to_target_interp") for r in runs]
    if any(i is None for i in iterations):
        raise SystemExit(f"a calibration run did not reach the target: {iterations}; see {out / 'calibration'}")
    target = runs[0]["target_loss"]
    T = round(statistics.fmean(iterations))
    calibration = {"T": T, "target": target, "iterations": iterations, "ci95": ci95(iterations),
                   "val_loss_se": [r.get("final_val_loss_se") for r in runs], "seeds": len(runs),
                   "run_seconds": run_seconds(runs),
                   # Each seed's environment: the report flags grid runs made in another.
                   "environments": [r.get("environment") for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    print(f"calibration: T = {T} iterations to {target} (per seed {[round(i) for i in iterations]})", flush=True)
    return calibration


PROBE_ITERATIONS = 600
"""The probe (one no-failure run) trains this long: 1.2 x TARGET_AT, enough to read its loss there (the
validations come every 50)."""
TARGET_AT = 500
"""``--target auto``: the target is the probe's validation loss after this many iterations (K = 20 paper
iterations per CPU iteration: the regime of the synthetic corpus, T ~ 500)."""
GRANULARITY_SIZES = (8, 4, 2, 1)
"""The granularity study's micro-batch sizes: the Table 2 regime's 8 sequences (4 micro-batches x 8 x 64 tokens
per CPU iteration, K ~ 20), halved, quartered and an eighth (each CPU iteration stands for fewer paper
iterations because it trains on fewer tokens; on pydocs K = 20.6, 13.3, 7.8 and ~4.5: smaller batches need
fewer tokens to the target, so K falls slower than the batch). Everything else is fixed: the target, the model, the 4
micro-batches, the learning rate (1e-3: the rule is a constant learning rate, so that K is the only change)."""
TOKENS_PER_SEQUENCE_BATCH = 4 * 64
"""Tokens of one CPU iteration per sequence of micro-batch size: 4 micro-batches of 64-token sequences."""
GRANULARITY_MAX_ITERATIONS = 5000
"""The calibration's cap at micro-batch size 8 (``calibrate``), scaled by 8 / size at the finer levels."""


def probe_dir(args: argparse.Namespace) -> Path:
    """The probe of a corpus (and overrides), under the experiment's own ``--out``: nothing is written elsewhere."""
    label = "_".join([args.data or "synthetic", *(o.replace("=", "-") for o in args.set)])
    return args.out / "probes" / label


def probe(out: Path, extra: list[str], iterations: int = PROBE_ITERATIONS) -> list[tuple[int, float]]:
    """The validation curve [(iteration, loss)] of one no-failure run (seed 0) of PROBE_ITERATIONS.

    A new corpus has no target yet: the probe fixes it from a no-failure run alone, before any failure is
    drawn — the loss it reaches after 500 iterations puts the corpus in the same regime as the synthetic one
    (T ~ 500, 20 paper iterations per CPU iteration). A longer probe of the same corpus serves as well."""
    from checkfree.run.runlog import run_metrics

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
    # Where run_point put it (the summary's run_dir may be stale); a clone has only its kept rows, validations
    # among them.
    return [(m["iteration"], m["val_loss"]) for m in run_metrics(Path(run["run_dir"])) if "val_loss" in m]


def target_at(curve: list[tuple[int, float]], iterations: float) -> float:
    """The probe's validation loss after ``iterations``, rounded to 3 decimals (a target one can write down)."""
    return round(interpolate(curve, iterations), 3)


def corpus_overrides(args: argparse.Namespace) -> list[str]:
    """``data=<corpus>`` and its target: given (--target), or fixed by the probe (--target auto)."""
    extra = [f"data={args.data}"] if args.data else []
    if args.target == "auto":
        # 1.2 x 500 iterations: enough to read the loss at 500 (the validations come every 50).
        target = target_at(probe(probe_dir(args), [*extra, *args.set]), TARGET_AT)
        print(f"target {target}: the probe's validation loss after {TARGET_AT} iterations", flush=True)
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
    cap = GRANULARITY_MAX_ITERATIONS * GRANULARITY_SIZES[0] // args.size
    if args.size != GRANULARITY_SIZES[0]:  # a finer clock: the granularity study's level, its own calibrated T
        extra = [*size_overrides(args.size), *extra]
    calibration = calibrate(args.out, args.seeds, args.jobs, extra, cap)
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
    if RAN:  # a report made from finished runs leaves their wall-time record as it is
        with open(args.out / "wall_time.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {minutes:.1f} min on {args.jobs} jobs "
                    f"(calibration included), {len(RAN)} points run in this invocation\n")


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


def size_overrides(size: int) -> list[str]:
    """``size`` sequences per micro-batch, validations every T / 10 (50 CPU iterations at the Table 2 regime's 8,
    scaled by 8 / size): one level of K, in the granularity study and in a main table made at that level."""
    return [f"trainer.micro_batch_size={size}", f"trainer.eval_every={round(50 * GRANULARITY_SIZES[0] / size)}"]


def level_overrides(size: int, target: float, extra: list[str]) -> list[str]:
    """One level of the granularity study: ``size_overrides`` and the one target."""
    return [*size_overrides(size), f"trainer.target_loss={target}", *extra]


def granularity(args: argparse.Namespace) -> None:
    """The same strategies at 16 %/h with K changed alone: the target fixed (the main table's), each CPU iteration
    trained on fewer tokens (``GRANULARITY_SIZES``), each level calibrated on its own T (so K = 10,000 / T is
    measured, not assumed). Hours to target / T (the paper's metric, as Table 2's) should not depend on K once
    the clock is fine enough; where it does, the report extrapolates it to the paper's K = 1."""
    start = time.perf_counter()
    sizes = [int(b) for b in args.sizes.split(",")]
    target = float(args.target) if args.target not in (None, "auto") else calibration_file(args)["target"]
    extra = [*([f"data={args.data}"] if args.data else []), *args.set]
    levels = {b: level_overrides(b, target, extra) for b in sizes}
    calibrations = {}
    if args.report_only:
        calibrations = {b: json.loads((args.out / f"b{b}" / "calibration.json").read_text()) for b in sizes
                        if (args.out / f"b{b}" / "calibration.json").is_file()}
        if not calibrations:
            raise SystemExit(f"{args.out} holds no calibrated level yet (b*/calibration.json): nothing to report")
    else:
        groups = [(calibration_points(args.seeds), args.out / f"b{b}" / "calibration",
                   calibration_overrides(levels[b], GRANULARITY_MAX_ITERATIONS * GRANULARITY_SIZES[0] // b))
                  for b in sizes]
        for b, runs in zip(sizes, run_groups(groups, args.jobs)):
            calibrations[b] = write_calibration(args.out / f"b{b}", runs)
    strategies = (args.strategies or "checkpoint,checkfree,checkfree_plus,snapshot_restore").split(",")
    points = [("table2", i, [f"strategy={name}", "failure.hourly_rate=0.16", f"seed={seed}"])
              for i, (name, seed) in enumerate((n, s) for n in strategies for s in range(args.seeds))]
    # The finest level (the longest runs) first, so that no core waits at the end for one long run.
    order = sorted(calibrations, key=lambda b: -calibrations[b]["T"])
    groups = [(points, args.out / f"b{b}" / "runs", [*regime(calibrations[b]["T"], CAP), *levels[b]])
              for b in order]
    grids = [so_far(p, out) for p, out, _ in groups] if args.report_only else run_groups(groups, args.jobs)
    records = [granularity_record(b, calibrations[b], r) for b, runs in zip(order, grids) for r in runs]
    every_run = [r for runs in grids for r in runs]
    environment = describe([r.get("environment") for r in every_run if "config" in r],
                           [e for c in calibrations.values() for e in c.get("environments", [])])
    frame = pd.DataFrame(records)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "granularity.csv", index=False)
    text = granularity_report(frame, calibrations, strategies) + (
        f"\n{environment}\n\nThis invocation {(time.perf_counter() - start) / 60:.1f} min of wall time; "
        f"{study_seconds(calibrations, every_run) / 60:.1f} run-minutes, calibration included.\n")
    (args.out / "granularity.md").write_text(text)
    plot_granularity(frame, args.out / "granularity.png")
    print(text)


def granularity_record(size: int, calibration: dict, run: dict) -> dict:
    """One run of the granularity study as a row: its level (micro-batch size, T, K) and its time to target / T
    in the paper's units (hours over the no-failure time of 10,000 paper iterations at the strategy's price)."""
    T = calibration["T"]
    seconds = run.get("time_to_target_interp_s")
    strategy = run.get("strategy")
    return {"micro_batch_size": size, "T": T, "K": PAPER_T / T, "strategy": strategy, "seed": run.get("seed"),
            "status": run.get("status"), "failures": run.get("n_failures"),
            "hours_to_target": seconds / 3600 if seconds is not None else None,
            "time_over_T": (seconds / (paper_iteration_seconds(strategy, RATE_16) * PAPER_T)
                            if seconds is not None else None),
            "iterations_to_target_over_T": (run["iterations_to_target_interp"] / T
                                            if run.get("iterations_to_target_interp") is not None else None),
            "iterations_so_far": run.get("iterations_so_far"), "wall_s": run.get("total_wall_time_s")}


def extrapolate(points: list[tuple[float, float]], at: float = 1.0) -> tuple[float, float, float]:
    """The least-squares line through (K, value) points (every seed of every level), evaluated at ``at``: the
    value, the 95 % half-width of that prediction of the mean (Student t on n - 2 degrees of freedom), and the
    slope. A line in K is the simplest model that says 'the value moves as the clock gets finer'; it is an
    extrapolation beyond the finest K measured, and the half-width says only how well the line is pinned."""
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    value = my + slope * (at - mx)
    if n < 3:
        return value, math.nan, slope
    residual = math.sqrt(sum((y - my - slope * (x - mx)) ** 2 for x, y in points) / (n - 2))
    return value, T95.get(n - 2, 1.96) * residual * math.sqrt(1 / n + (at - mx) ** 2 / sxx), slope


def granularity_report(frame: pd.DataFrame, calibrations: dict[int, dict], strategies: list[str]) -> str:
    """The table: each strategy's time to target / T at each level (mean ± 95 % CI, seeds that reached the target
    within the cap), whether it moves with K, and its extrapolation to K = 1."""
    sizes = sorted(calibrations, key=lambda b: calibrations[b]["T"])
    head = ("| strategy | " + " | ".join(f"K = {PAPER_T / calibrations[b]['T']:.1f} (b = {b}, T = "
                                          f"{calibrations[b]['T']})" for b in sizes)
            + " | slope per unit K | extrapolated to K = 1 |")
    rows = [head, "|---|" + "---|" * (len(sizes) + 2)]
    for name in strategies:
        cells, points = [], []
        for b in sizes:
            mine = frame[(frame.strategy == name) & (frame.micro_batch_size == b)] if len(frame) else frame
            values = [v for v in mine.get("time_over_T", []) if v is not None and v == v]
            done = [s for s in mine.get("status", []) if s == "completed"]
            points += [(PAPER_T / calibrations[b]["T"], v) for v in values]
            if not len(mine):
                cells.append("not run yet")
            elif len(done) < len(mine):
                cells.append(f"{len(done)}/{len(mine)} runs finished")
            else:
                cells.append(f"{fmt(values, '.2f')} ({len(values)}/{len(mine)})" if values
                             else f"not reached in {CAP:g} T (0/{len(mine)})")
        Ks = {k for k, _ in points}
        if len(Ks) >= 2:
            value, half, slope = extrapolate(points)
            cells += [f"{slope:+.4f}", f"{value:.2f}" + (f" ± {half:.2f}" if half == half else "")]
        else:
            cells += ["—", "—"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    cal = "; ".join(f"b = {b}: T = {calibrations[b]['T']} ({', '.join(str(round(i)) for i in calibrations[b]['iterations'])}), "
                    f"{calibrations[b]['T'] * b * TOKENS_PER_SEQUENCE_BATCH / 1e6:.3f} M tokens" for b in sizes)
    return "\n".join(rows) + (
        "\n\nTime to target / T at 16 %/h: hours to target over the no-failure time (10,000 paper iterations at the "
        "strategy's paper price), as Table 2's column; mean ± 95 % CI over seeds, in brackets the seeds that reached "
        f"the target within {CAP:g} T. K = 10,000 / T: paper iterations per CPU iteration, set by the tokens of one "
        "CPU iteration alone (b sequences per micro-batch, 4 micro-batches of 64 tokens); the target "
        f"({calibrations[sizes[0]]['target']}), the model and "
        "the learning rate are the same at every level. Extrapolation: the least-squares line through every seed's "
        f"value against K, at K = 1, with the 95 % half-width of that prediction. Calibration (no failures), T and the "
        f"tokens it trains on: {cal} -- T would scale as 1 / b if every token taught as much at every batch size; "
        "it grows slower where smaller batches reach the target on fewer tokens.\n")


def study_seconds(calibrations: dict[int, dict], runs: list[dict]) -> float:
    """The study's run-seconds: each level's calibration (its calibration.json holds its runs' summed seconds,
    not their summaries) and its runs' own (``run_seconds``)."""
    return sum(c.get("run_seconds", 0.0) for c in calibrations.values()) + run_seconds(runs)


def so_far(points: list[tuple[str, int, list[str]]], out: Path) -> list[dict]:
    """Each point's summary as it stands, without running anything (``--report-only``): a run not finished
    yet also says how many iterations it has done (the last line of its metrics)."""
    from checkfree.run.runlog import run_metrics

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


def plot_granularity(frame: pd.DataFrame, path: Path) -> None:
    """Time to target / T against K, one line per strategy (the mean over the seeds that reached the target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    reached = frame.dropna(subset=["time_over_T"]) if "time_over_T" in frame else frame.iloc[0:0]
    for name, rows in reached.groupby("strategy"):
        means = rows.groupby("K")["time_over_T"].mean().sort_index()
        ax.plot(means.index, means.values, marker="o", label=name)
    ax.set_xlabel("paper iterations per CPU iteration (K)")
    ax.set_ylabel("time to target / T (paper units)")
    ax.set_xlim(left=0)
    ax.set_title("16 %/h, target fixed: K changed by the tokens per CPU iteration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seconds(runs: list[dict]) -> float:
    """The runs' own wall times, summed (a run that failed to start counts 0)."""
    return sum(r.get("total_wall_time_s") or 0.0 for r in runs)


def ablation_rows(width: int, calibration: dict, runs: list[dict]) -> tuple[list[str], list[dict]]:
    """The table's rows for one width, and every run's own figures (for runs.csv)."""
    from checkfree.run.runlog import run_metrics

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
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: results/{out}, or results/{out}_bB at a --size B other than 8")
    parser.set_defaults(experiment=out)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs there are")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--size", type=int, default=GRANULARITY_SIZES[0],
                        help="sequences per micro-batch: the clock's granularity level, as table2.py's --size "
                             "(default 8, K ~ 20; 2: K ~ 8, with results/table2_<data>_b2's calibration)")


def calibration_file(args: argparse.Namespace) -> dict:
    """``args.data``'s calibration.json (T, target, the calibration runs' environments), or a one-line exit
    saying how to make it."""
    size = getattr(args, "size", GRANULARITY_SIZES[0])
    level = "" if size == GRANULARITY_SIZES[0] else f"_b{size}"
    path = args.calibration or ROOT / "results" / f"table2_{args.data}{level}" / "calibration.json"
    if not path.is_file():
        made = "--target auto" if not level else f"--size {size} --out results/table2_{args.data}{level}"
        raise SystemExit(f"{path} does not exist: run experiments/table2.py --data {args.data} {made} "
                         "first (its calibration fixes T and the target), or pass --calibration")
    return json.loads(path.read_text())


def calibration_of(args: argparse.Namespace) -> tuple[int, float]:
    """(T, target) of ``args.data``'s calibration."""
    calibration = calibration_file(args)
    return calibration["T"], calibration["target"]


def runs_of(args: argparse.Namespace, out: Path, points: list[tuple[str, int, list[str]]],
            extra: list[str]) -> list[dict]:
    """Every point's summary: run now (resuming), or with ``--report-only`` read from the runs there are. A
    ``--size`` other than the main table's runs every point at that granularity level (``size_overrides``)."""
    if args.report_only:
        return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*/summary.json"))]
    level = size_overrides(args.size) if args.size != GRANULARITY_SIZES[0] else []
    return run_all(points, out / "runs", [*extra, *level, *args.set], args.jobs)


def refuse(flag: str, value: object, allowed: str) -> None:
    """Bad input: one sentence naming the flag, the value and what is allowed, on stderr; exit 2, nothing run."""
    print(f"error: {flag}={value} is invalid: {allowed}.", file=sys.stderr)
    raise SystemExit(2)


def numbers(flag: str, text: str, kind: type = float) -> list:
    """A comma-separated list of numbers, or a refusal naming the flag."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        refuse(flag, text, f"a comma-separated list of {'integers' if kind is int else 'numbers'}")
    if not values or any(not math.isfinite(v) for v in values):
        refuse(flag, text, "finite numbers")
    return values


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag of an experiment script checked before any work (a probe, a calibration, a run): the ones
    ``calibrated_arguments`` and ``main`` define, as far as the script has them."""
    RAN.clear()  # this invocation's
    if getattr(args, "experiment", None) is not None and args.out is None:  # a calibrated experiment's default
        size = getattr(args, "size", GRANULARITY_SIZES[0])
        args.out = ROOT / "results" / (args.experiment + ("" if size == GRANULARITY_SIZES[0] else f"_b{size}"))
    if args.seeds < 1:
        refuse("--seeds", args.seeds, "at least 1")
    if args.jobs < 1:
        refuse("--jobs", args.jobs, "at least 1 run at a time")
    if args.out.exists() and not args.out.is_dir():
        refuse("--out", args.out, "a directory (this is a file)")
    data = getattr(args, "data", None)
    if data is not None and not (ROOT / "conf" / "data" / f"{data}.yaml").is_file():
        refuse("--data", data, f"one of {sorted(p.stem for p in (ROOT / 'conf' / 'data').glob('*.yaml'))}")
    bad = [o for o in args.set if "=" not in o]
    if bad:
        refuse("--set", bad[0], "KEY=VALUE overrides")
    calibration = getattr(args, "calibration", None)
    if calibration is not None and not calibration.is_file():
        refuse("--calibration", calibration, "the calibration.json of experiments/table2.py (no such file)")
    strategies = getattr(args, "strategies", None)
    if strategies:
        from checkfree.recovery import STRATEGIES

        unknown = [n for n in strategies.split(",") if n not in STRATEGIES]
        if unknown:
            refuse("--strategies", strategies, f"names of {sorted(STRATEGIES)}")
    for flag in ("rates", "rate"):
        if getattr(args, flag, None) is not None:
            text = str(getattr(args, flag))
            if any(not 0 < r <= 1 for r in numbers(f"--{flag}", text)):
                refuse(f"--{flag}", text, "hourly failure rates per stage in (0, 1]")
    if getattr(args, "bandwidths", None) is not None and any(b <= 0 for b in numbers("--bandwidths", args.bandwidths)):
        refuse("--bandwidths", args.bandwidths, "positive numbers of Mb/s")
    if getattr(args, "sizes", None) is not None and any(b < 1 for b in numbers("--sizes", args.sizes, int)):
        refuse("--sizes", args.sizes, "micro-batch sizes of at least 1")
    if getattr(args, "size", None) is not None and args.size < 1:
        refuse("--size", args.size, "a micro-batch size of at least 1")
    if getattr(args, "widths", None) is not None and any(w < 16 for w in numbers("--widths", args.widths, int)):
        refuse("--widths", args.widths, "d_model values of at least 16 (heads of 16 dimensions)")
    target = getattr(args, "target", None)
    if target not in (None, "auto"):
        try:
            if not float(target) > 0:
                raise ValueError
        except ValueError:
            refuse("--target", target, "'auto' or a positive validation loss")


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
    parser.add_argument("--sizes", default=",".join(map(str, GRANULARITY_SIZES)),
                        help="granularity: the micro-batch sizes, one level of K each (8 is the main table's)")
    parser.add_argument("--size", type=int, default=GRANULARITY_SIZES[0],
                        help="main: sequences per micro-batch, the clock's granularity (default 8: K ~ 20 paper "
                             "iterations per CPU iteration; 2: K ~ 8, the headline table's level)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="granularity: the main table's calibration.json, whose target the study keeps "
                             "(default: results/table2_<data>/calibration.json; --target overrides it)")
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
    check_arguments(args)
    with archived(args.out):  # its runs come from, and go back into, args.out/runs.parquet
        {"main": main_table, "ablations": ablations, "granularity": granularity}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
