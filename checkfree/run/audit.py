"""Invariants of a finished run directory: what every run must leave, however hard it was hit.

Every metrics line parses, there is exactly one record per iteration, no training loss is non-finite, and
every lost stage is matched by exactly one recovery record (per iteration and stage, in ``metrics.jsonl``
and ``summary.json``). ``benchmarks/soak.py`` checks them after hundreds of iterations at a brutal failure
rate; the tests check them on short runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from checkfree.run.runlog import read_metrics


class AuditFailure(AssertionError):
    """A run invariant did not hold; the message says which run and which record."""


def parse_metrics(path: Path) -> list[dict]:
    """Every line of metrics.jsonl, strictly: a line that does not parse is a lost result."""
    try:
        return read_metrics(path, bad="raise")
    except ValueError as exc:
        raise AuditFailure(str(exc)) from None


def check_run(run_dir: Path, iterations: int) -> dict[str, Any]:
    """Assert the soak invariants on a finished run directory; return its figures."""
    run_dir = Path(run_dir)
    records = parse_metrics(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    where = f"{run_dir}"
    if summary["status"] != "completed":
        raise AuditFailure(f"{where}: status {summary['status']!r} ({summary.get('error')})")
    seen = [r["iteration"] for r in records]
    if seen != list(range(iterations + 1)):
        raise AuditFailure(f"{where}: metrics hold iterations {seen[:5]}...{seen[-5:]} (n={len(seen)}), "
                          f"not exactly 0..{iterations} once each")
    losses, simultaneous, adjacent, per_stage = [], 0, 0, {}
    for r in records[1:]:
        loss = r["train_loss"]
        if not isinstance(loss, float) or not math.isfinite(loss):
            raise AuditFailure(f"{where}: non-finite train_loss {loss!r} at iteration {r['iteration']}")
        losses.append(loss)
        failed = sorted(r["failed_stages"])
        recovered = sorted(x["stage"] for x in r["recoveries"])
        if failed != recovered:
            raise AuditFailure(f"{where}: iteration {r['iteration']} lost stages {failed} but recovered {recovered}")
        simultaneous += len(failed) >= 2
        adjacent += any(b - a == 1 for a, b in zip(failed, failed[1:]))
        for k in failed:
            per_stage[k] = per_stage.get(k, 0) + 1
    lost = sorted((f["iteration"], f["stage"]) for f in summary["failures"])
    rebuilt = sorted((x["iteration"], x["stage"]) for x in summary["recoveries"])
    if lost != rebuilt or summary["n_failures"] != summary["n_recoveries"]:
        raise AuditFailure(f"{where}: summary has {summary['n_failures']} failures but {summary['n_recoveries']} "
                          "recoveries, or they do not pair up by (iteration, stage)")
    return {
        "strategy": summary["strategy"], "iterations": summary["iterations"], "failures": summary["n_failures"],
        "recoveries": summary["n_recoveries"], "by_method": summary["recoveries_by_method"],
        "simultaneous": simultaneous, "adjacent": adjacent, "per_stage": dict(sorted(per_stage.items())),
        "lost_iterations": summary["lost_iterations"], "min_loss": min(losses), "max_loss": max(losses),
        "initial_val_loss": summary["initial_val_loss"], "final_val_loss": summary["final_val_loss"],
    }
