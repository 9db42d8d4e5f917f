"""Where a run's results go: ``metrics.jsonl``, ``summary.json``, the progress bar and wandb.

Results must survive the run dying: every metrics line is written with one ``os.write`` on an
``O_APPEND`` descriptor (a kill can lose a line, never leave half of one), and ``summary.json`` is
replaced atomically, so a reader always sees a whole file.

They must survive a full disk too. A metrics line is all or nothing (``append_whole``: a short write is
completed, which takes a second ``os.write``, or rolled back), and the last summary still gets written,
with status "error" and the sentence of the failed write, because a ``summary.reserve`` file holds room
for it from the start of the run (see ``RunLog.summary``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from checkfree.storage.atomic import NO_SPACE, WriteError, write_atomic, write_error

WALL_CLOCK_FIELDS = {"wall_time_s", "throughput_tok_s"}
"""Metrics fields that measure this machine, not the run: everything else is reproducible at a seed."""


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so every line stays parseable by any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


RESERVE_FILE = "summary.reserve"
RESERVE_BYTES = 64 * 1024
"""Room held for the last summary.json. A summary is ~3 KB plus ~0.2 KB per failure and recovery; a
larger one is written without its per-event lists when it has to fit (``compact``)."""
PER_EVENT = ("failures", "recoveries")
"""Summary lists that metrics.jsonl holds as well (``failed_stages``, ``recoveries`` of each record)."""


def _json(payload: dict) -> bytes:
    return json.dumps(_clean(payload), indent=2).encode()


def write_json_atomic(path: Path, payload: dict, reuse: Path | None = None) -> None:
    data = _json(payload)
    write_atomic(path, lambda f: f.write(data), reuse=reuse)


def compact(payload: dict) -> dict:
    """The summary without its per-event lists (their counts stay; metrics.jsonl has every event)."""
    out = {k: v for k, v in payload.items() if k not in PER_EVENT}
    out["omitted_for_space"] = [k for k in PER_EVENT if k in payload]
    return out


def append_whole(fd: int, data: bytes, path: Path) -> None:
    """Append ``data`` to the ``O_APPEND`` descriptor ``fd`` all or nothing.

    A full disk can take part of a write: the rest is written (the next call may find room), or, when the
    disk refuses it, the file is cut back to where this line began, so it never ends in half a line. Then
    a WriteError names ``path`` and the cause. (Nothing else appends here: the run owns its directory.)
    """
    start = os.lseek(fd, 0, os.SEEK_END)
    written = 0
    try:
        while written < len(data):
            n = os.write(fd, data[written:])
            if n == 0:  # no progress and no error: treat it as the full disk it almost surely is
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written += n
    except OSError as exc:
        if written:
            # Freeing blocks needs no free space. Should it fail anyway, the torn line is the last one, which
            # read_metrics skips and a resume (truncate_metrics) drops.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
        raise write_error(exc, path) from exc


def hold_reserve(path: Path, size: int = RESERVE_BYTES) -> None:
    """Write ``size`` bytes at ``path`` that the last summary can later be written into (``RunLog.summary``).

    Real bytes, fsynced: a sparse or fallocated file may hold no blocks on a compressing or copy-on-write
    file system, and random ones because zeros would be compressed away.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        append_whole(fd, os.urandom(size), path)
        os.fsync(fd)
    except OSError as exc:
        path.unlink(missing_ok=True)  # a part of it is no use, and the disk is full
        error = write_error(exc, path)
        if error is exc:
            raise
        raise error from exc
    finally:
        os.close(fd)


def wandb_line(wandb_dir: str | None, url: str | None = None) -> str | None:
    """The one line that says where wandb's files are (wandb itself prints nothing: ``RunLog``)."""
    if wandb_dir is None:
        return None
    if url is not None:
        return f"wandb: {url} (its local files: {wandb_dir})"
    return f"wandb: offline run in {wandb_dir}; `wandb sync {wandb_dir}` uploads it"


def read_metrics(path: Path, bad: str = "skip") -> list[dict]:
    """The records of a metrics.jsonl ([] if there is none). A line that is not a JSON object (a torn last line
    of a killed writer) is skipped (``bad="skip"``), skipped with a warning (``"warn"``), or is an error naming
    the file and line (``"raise"``: a lost result, where a run must not have any)."""
    path = Path(path)
    if not path.is_file():
        return []
    records, skipped = [], []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if bad == "raise":
                raise ValueError(f"{path}:{lineno} does not parse ({exc}): {line[:80]!r}") from None
            skipped.append((lineno, exc))
            continue
        records.append(record)
    if skipped and bad == "warn":  # one warning a file, however many lines: a reader wants the count
        lineno, exc = skipped[0]
        warnings.warn(SkippedLines(path, len(skipped), f"{path}:{lineno} ({exc})"), stacklevel=2)
    return records


KEPT_METRICS = "metrics_kept.jsonl"
"""The rows and fields of a run's metrics.jsonl that its reports read, small enough to keep in git (experiments'
run directories are git-ignored but for this file and summary.json, so a fresh clone resumes a sweep)."""
KEPT_FIELDS = ("iteration", "progress", "sim_time_s", "wall_time_s", "val_loss", "failed_stages")
"""What ``checkfree.analysis.load_run`` and the experiments' reports read of a record (the curve, the failure
marks, how far a run got); the rest (recoveries, per-stage lr and gradient norms) stays in metrics.jsonl, and
the summary has every recovery."""


def keep_metrics(run_dir: Path) -> Path | None:
    """Write KEPT_METRICS (atomically): KEPT_FIELDS of the first and last record, every validation and every
    iteration that lost a stage; None where the run left no metrics."""
    from checkfree.storage.atomic import write_atomic

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        return None
    kept = [{k: r[k] for k in KEPT_FIELDS if k in r} for i, r in enumerate(records)
            if i in (0, len(records) - 1) or "val_loss" in r or r.get("failed_stages")]
    text = "".join(json.dumps(r) + "\n" for r in kept).encode()
    return write_atomic(Path(run_dir) / KEPT_METRICS, lambda f: f.write(text))


TIMINGS = "timings.jsonl"
"""Every record's clock and wall times (``TIMING_FIELDS``), kept by an experiment that compares the two
(``experiments/clock_check.py``): a run's simulated seconds beside its real ones, iteration by iteration."""
TIMING_FIELDS = ("iteration", "sim_time_s", "wall_time_s", "iteration_sim_s", "overhead_sim_s", "recovery_sim_s",
                 "lost_work_sim_s", "val_loss", "failed_stages")


def keep_timings(run_dir: Path) -> Path | None:
    """Write TIMINGS (atomically) from the run's metrics.jsonl; None where it left none."""
    from checkfree.storage.atomic import write_atomic

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        return None
    rows = []
    for r in records:
        row = {k: r[k] for k in TIMING_FIELDS if k in r}
        if r.get("recoveries"):  # the real seconds of the iteration's recovery (its attempts, all of them), and the
            # clock's price of the recovery alone (the record's recovery_sim_s adds the step it interrupted)
            row["recovery_wall_s"] = max(x.get("wall_s") or 0.0 for x in r["recoveries"])
            row["recovery_price_s"] = max(x.get("sim_seconds") or 0.0 for x in r["recoveries"])
        rows.append(row)
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return write_atomic(Path(run_dir) / TIMINGS, lambda f: f.write(text))


def run_metrics(run_dir: Path, bad: str = "skip") -> list[dict]:
    """A run's records: its metrics.jsonl, or where that is absent (a clone holds only the kept rows) its
    KEPT_METRICS. ``bad`` as ``read_metrics``."""
    full = Path(run_dir) / "metrics.jsonl"
    return read_metrics(full if full.is_file() else Path(run_dir) / KEPT_METRICS, bad)


class SkippedLines(RuntimeWarning):
    """``read_metrics(bad="warn")`` skipped ``count`` unparsable lines of ``path`` (``first`` says where)."""

    def __init__(self, path: Path, count: int, first: str) -> None:
        super().__init__(f"{path}: skipped {count} unparsable metrics line{'s' if count > 1 else ''} (first: {first})")
        self.path, self.count, self.first = path, count, first


def deterministic_view(records: list[dict]) -> list[dict]:
    """Metrics records without the wall-clock fields (also inside recoveries, and the process engine's PIDs
    and phases): two runs of the same config and seed give equal views, whatever the machine did meanwhile,
    and so do the local and the process engine."""
    out = []
    for record in records:
        record = {k: v for k, v in record.items() if k not in WALL_CLOCK_FIELDS}
        record["recoveries"] = [{k: v for k, v in r.items() if k not in ("wall_s", "process")}
                                for r in record.get("recoveries", [])]
        out.append(record)
    return out


class RunLog:
    """Append-only metrics, an always-valid summary, and optional progress bar and wandb."""

    def __init__(self, run_dir: Path, config: dict, wandb_cfg: Any, total: int, progress_bar: bool = True,
                 resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.reserve_path = self.run_dir / RESERVE_FILE
        # First: on a disk already too full for it the run stops here, before writing anything else.
        hold_reserve(self.reserve_path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC)
        self._fd = os.open(self.metrics_path, flags, 0o644)
        self.bar = tqdm(total=total, dynamic_ncols=True, disable=not progress_bar, desc="train")
        self.wandb_dir: Path | None = None
        """wandb's run directory (``run_dir/wandb/offline-run-…``), None without wandb."""
        self.wandb_url: str | None = None
        self.wandb = self._start_wandb(config, wandb_cfg)

    def _start_wandb(self, config: dict, wandb_cfg: Any):
        if wandb_cfg.mode == "disabled":
            return None
        try:
            import wandb

            # silent: wandb's banner and its ~25-line run history at finish would bury our own summary; its
            # messages go to its debug log instead, and the files it writes are the same. We say in one line
            # where they are (``wandb_line``).
            run = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode, dir=str(self.run_dir), config=config, reinit="finish_previous",
                settings=wandb.Settings(silent=True),
            )
        except Exception as exc:  # wandb is a convenience: it never stops a training run
            warnings.warn(f"wandb could not start ({exc}); continuing without it", stacklevel=2)
            return None
        self.wandb_dir = Path(run.settings.sync_dir)
        self.wandb_url = run.url if wandb_cfg.mode == "online" else None
        return run

    def log(self, record: dict) -> None:
        append_whole(self._fd, (json.dumps(_clean(record)) + "\n").encode(), self.metrics_path)
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, int | float)}
            for name in ("grad_norm", "lr"):
                for i, v in enumerate(record.get(name) or []):
                    flat[f"{name}/stage{i}"] = v
            self.wandb.log(flat, step=record["iteration"])

    def progress(self, record: dict, n_failures: int) -> None:
        postfix = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record.get('throughput_tok_s', 0):.0f}",
                   "fail": n_failures}
        if "val_loss" in record:
            postfix["val"] = f"{record['val_loss']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def summary(self, payload: dict) -> None:
        """Replace summary.json atomically; on a full disk, write it into the blocks of the reserve.

        Writing into blocks already allocated needs no free space, and nobody else can take them first,
        as anyone could take the space a deleted reserve gives back. On a copy-on-write file system an
        overwrite needs new blocks as well; the reserve's are free by then, so one plain write follows.
        """
        try:
            write_json_atomic(self.summary_path, payload)
            return
        except WriteError as exc:
            if exc.errno not in NO_SPACE or not self.reserve_path.is_file():
                raise
        if len(_json(payload)) > self.reserve_path.stat().st_size:
            payload = compact(payload)
        try:
            write_json_atomic(self.summary_path, payload, reuse=self.reserve_path)
        except WriteError as exc:
            if exc.errno not in NO_SPACE:
                raise
            write_json_atomic(self.summary_path, payload)

    def close(self, exit_code: int = 0) -> None:
        """Close everything, whatever fails first; then raise a failed fsync of metrics.jsonl."""
        self.bar.close()
        error = None
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:  # e.g. a network file system reporting a full disk only now
                error = write_error(exc, self.metrics_path)
            finally:
                os.close(self._fd)
                self._fd = None
        with contextlib.suppress(OSError):
            self.reserve_path.unlink()  # the run is over: no summary left to keep room for
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None
        if error is not None:
            raise error
