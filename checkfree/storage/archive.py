"""Results a clone can carry: an experiment's runs in one Parquet file beside its reports.

An experiment (``experiments/*.py --out results/<name>``) leaves one run directory per point, each with a
``summary.json`` and the rows its reports read (``metrics_kept.jsonl``, ``runlog.keep_metrics``). Kept in git
file by file they were hundreds of files per experiment; ``pack`` stores them in ``<out>/runs.parquet`` (one
row per file: the run directory relative to ``<out>``, the file's name and its bytes, zstd-compressed), and
``unpack`` writes them back where they were, so that a fresh clone's experiment resumes (a completed point is
not run again) and its reports regenerate to the digit from the same bytes. A run is the unit: ``unpack`` leaves
a run directory that has a ``summary.json`` alone (a run made here is newer than the archive), and ``pack``
replaces every archived file of a run that is here by what is here. Packs of one directory take a lock, one
after another. ``archived(out)`` does both around an experiment.

    python -m checkfree.storage.archive pack results/crossover     # after making runs by hand
    python -m checkfree.storage.archive unpack results/crossover   # what an experiment does first
"""

from __future__ import annotations

import argparse
import fcntl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from checkfree.run.runlog import KEPT_METRICS, TIMINGS, keep_metrics
from checkfree.storage.atomic import write_atomic

ARCHIVE = "runs.parquet"
KEPT = ("summary.json", KEPT_METRICS, TIMINGS)
"""The files of a run directory an archive keeps: what the reports and a resumed experiment read (the timings
only where an experiment wrote them)."""
SCHEMA = pa.schema([("run", pa.string()), ("file", pa.string()), ("data", pa.binary())])


def run_dirs(out: Path) -> list[Path]:
    """Every run directory under ``out`` (a directory holding a ``summary.json``), in path order."""
    return sorted(p.parent for p in Path(out).rglob("summary.json"))


def pack(out: Path) -> Path:
    """Store every run directory under ``out`` (its ``KEPT`` files) in ``out/runs.parquet``, replacing it
    atomically. A run whose kept rows are missing gets them made from its ``metrics.jsonl`` first. Runs the
    archive holds but that are not here (a clone that unpacked only some) stay in it."""
    out = Path(out)
    with open(out / f".{ARCHIVE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another experiment packing here waits (released when the file closes)
        here = {run_dir.relative_to(out).as_posix(): run_dir for run_dir in run_dirs(out)}
        rows: dict[tuple[str, str], bytes] = {(r, f): d for r, f, d in read(out) if r not in here}
        for run, run_dir in here.items():
            if not (run_dir / KEPT_METRICS).exists() and (run_dir / "metrics.jsonl").exists():
                keep_metrics(run_dir)
            for name in KEPT:
                if (run_dir / name).is_file():
                    rows[(run, name)] = (run_dir / name).read_bytes()
        keys = sorted(rows)
        table = pa.table({"run": [k[0] for k in keys], "file": [k[1] for k in keys],
                          "data": [rows[k] for k in keys]}, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", compression_level=9)
        path = out / ARCHIVE
        payload = sink.getvalue().to_pybytes()
        write_atomic(path, lambda f: f.write(payload))
    return path


def read(out: Path) -> list[tuple[str, str, bytes]]:
    """The (run, file, bytes) rows of ``out/runs.parquet``; none where there is no archive."""
    path = Path(out) / ARCHIVE
    if not path.is_file():
        return []
    table = pq.read_table(path)
    if table.schema.names != SCHEMA.names:
        raise ValueError(f"{path} is not a run archive: its columns are {table.schema.names}, "
                         f"an archive's are {SCHEMA.names}")
    return list(zip(*(table.column(n).to_pylist() for n in SCHEMA.names), strict=True))


def unpack(out: Path) -> int:
    """Write every archived run of ``out/runs.parquet`` back into its run directory, except a run whose directory
    has a ``summary.json`` here (it is newer); returns how many files were written."""
    out = Path(out).resolve()
    written = 0
    entries = read(out)
    for run, name, _ in entries:
        target = (out / run / name).resolve()
        if out not in target.parents or name not in KEPT:
            raise ValueError(f"{out / ARCHIVE}: the entry {run}/{name} is outside the run directories it may write")
    present = {run for run, _, _ in entries if (out / run / "summary.json").exists()}
    for run, name, data in entries:
        target = out / run / name
        if run not in present and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, lambda f, data=data: f.write(data))
            written += 1
    return written


@contextmanager
def archived(out: Path) -> Iterator[None]:
    """Around an experiment writing into ``out``: its archived runs unpacked first (so they resume), and every
    run there packed again at the end, however the experiment ends (an interrupted one's finished points are
    carried too)."""
    unpack(out)
    try:
        yield
    finally:
        if run_dirs(out):
            pack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("dirs", nargs="+", type=Path, help="experiment output directories (results/<name>)")
    args = parser.parse_args(argv)
    for out in args.dirs:
        if not out.is_dir():
            parser.error(f"{out} is not a directory")
        if args.action == "pack":
            print(f"{pack(out)}: {len(run_dirs(out))} runs")
        else:
            print(f"{out}: {unpack(out)} files written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
