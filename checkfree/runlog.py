"""Where a run's results go: ``metrics.jsonl``, ``summary.json``, the progress bar and wandb.

Results must survive the run dying: every metrics line is written with one ``os.write`` on an
``O_APPEND`` descriptor (a kill can lose a line, never leave half of one), and ``summary.json`` is
replaced atomically, so a reader always sees a whole file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from checkfree.atomic import write_atomic

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


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(_clean(payload), indent=2).encode()))


def read_metrics(path: Path, bad: str = "skip") -> list[dict]:
    """The records of a metrics.jsonl ([] if there is none). A line that is not a JSON object (a torn last line
    of a killed writer) is skipped (``bad="skip"``), skipped with a warning (``"warn"``), or is an error naming
    the file and line (``"raise"``: a lost result, where a run must not have any)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
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
            if bad == "warn":
                warnings.warn(f"{path}:{lineno}: skipping unparsable metrics line ({exc})", RuntimeWarning,
                              stacklevel=2)
            continue
        records.append(record)
    return records


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
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC)
        self._fd = os.open(self.metrics_path, flags, 0o644)
        self.bar = tqdm(total=total, dynamic_ncols=True, disable=not progress_bar, desc="train")
        self.wandb = self._start_wandb(config, wandb_cfg)

    def _start_wandb(self, config: dict, wandb_cfg: Any):
        if wandb_cfg.mode == "disabled":
            return None
        try:
            import wandb

            return wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode, dir=str(self.run_dir), config=config, reinit="finish_previous",
            )
        except Exception as exc:  # wandb is a convenience: it never stops a training run
            warnings.warn(f"wandb could not start ({exc}); continuing without it", stacklevel=2)
            return None

    def log(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(_clean(record)) + "\n").encode())
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
        write_json_atomic(self.summary_path, payload)

    def close(self, exit_code: int = 0) -> None:
        self.bar.close()
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None
