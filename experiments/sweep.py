"""Run checked-in sweeps (``conf/sweep/<name>.yaml``) with several points at a time, then analyse them.

Hydra's own ``-m`` runs sweep points one after another; on a 2-core machine that leaves a core idle, so
this script expands the same ``hydra.sweeper.params`` grid and runs each point as its own
``python -m checkfree.train +sweep=<name> k=v ...`` process (one torch thread each), ``--jobs`` at a
time. Every point is a real Hydra job with its own run directory. A failing point is reported and the
sweep goes on; the analysis lists it as missing.

    python experiments/sweep.py compare baseline ablations swap --out results/sweep --jobs 2
    python experiments/sweep.py smoke --out /tmp/smoke            # two minutes, for trying it out
    python experiments/sweep.py compare --set model=llama_500m data=openwebtext ...   # paper scale, on GPUs
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from checkfree.run.runlog import KEPT_METRICS, keep_metrics
from checkfree.storage.archive import archived

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "conf" / "sweep"


def grid(name: str) -> list[list[str]]:
    """The override lists of every point of sweep ``name`` (cartesian product, Hydra's order)."""
    path = SWEEPS / f"{name}.yaml"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in SWEEPS.glob("*.yaml")))
        raise SystemExit(f"sweep {name!r} does not exist; available: {available}")
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params") or {}
    axes = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(point) for point in itertools.product(*axes)]


def run_point(name: str, index: int, overrides: list[str], out: Path, extra: list[str]) -> tuple[str, int, float]:
    label = "_".join(o.split("=", 1)[1] for o in overrides)
    run_dir = out / name / f"{index:03d}_{label}"
    if (run_dir / "summary.json").exists() and '"completed"' in (run_dir / "summary.json").read_text():
        if not (run_dir / KEPT_METRICS).exists():  # finished before run directories kept their rows
            keep(run_dir)
        return str(run_dir), 0, 0.0  # already done: sweeps can be resumed by running them again
    (run_dir / KEPT_METRICS).unlink(missing_ok=True)  # a previous attempt's rows must not outlive it
    cmd = [sys.executable, "-m", "checkfree.train", f"+sweep={name}", *overrides, *extra,
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    keep(run_dir)
    return str(run_dir), code, time.perf_counter() - start


def keep(run_dir: Path) -> None:
    """What git keeps of a run (with its summary), so that a fresh clone resumes from it. A failure to write it
    (a full disk) is a warning: one point never stops the sweep."""
    try:
        keep_metrics(run_dir)
    except OSError as exc:
        print(f"warning: {run_dir / KEPT_METRICS} not written ({exc}); a clone will run this point again",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="names of conf/sweep/*.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-analysis", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every point, e.g. --set trainer.iterations=100")
    args = parser.parse_args(argv)
    extra = list(args.set)

    points = [(name, i, overrides) for name in args.sweeps for i, overrides in enumerate(grid(name))]
    print(f"{len(points)} points, {args.jobs} at a time -> {args.out}", flush=True)
    with archived(args.out):  # its runs come from, and go back into, out/runs.parquet
        start, failed = time.perf_counter(), []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_point, name, i, o, args.out, extra) for name, i, o in points]
            for done, future in enumerate(futures, 1):
                run_dir, code, seconds = future.result()
                status = "ok" if code == 0 else f"FAILED (exit {code}, see {run_dir}/stdout.log)"
                print(f"[{done}/{len(points)}] {Path(run_dir).name}: {status} in {seconds:.0f} s", flush=True)
                if code != 0:
                    failed.append(run_dir)
        print(f"sweep finished in {(time.perf_counter() - start) / 60:.1f} min, {len(failed)} failed point(s)")
        if not args.no_analysis:
            from checkfree.analysis import main as analysis_main

            analysis_main([str(args.out), "--out", str(args.out / "analysis")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
