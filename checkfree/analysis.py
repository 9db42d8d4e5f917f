"""Runs -> comparison tables and plots: which recovery strategy reaches a target validation loss first.

Strategies are compared by *time to target*: the first simulated wall-clock time at which a run's
validation loss is at or below a target loss, per strategy and hourly failure rate, averaged over seeds,
with speed-ups against checkpointing, redundant computation and the failure-free ``none`` runs.

Run it on one or more run or sweep directories (searched recursively)::

    python -m checkfree.analysis multirun/2025-01-01/12-00-00 [more dirs] [--out OUT] [--target 3.5]

It prints the Markdown table and writes ``comparison.md``, ``comparison.csv``, ``val_loss_vs_time.png``
and ``time_to_target.png`` into ``OUT`` (default: ``<first dir>/analysis``). From Python::

    df = load_runs(["multirun"]); table = comparison_table(df); write_report(df, "out")

A run directory holds the trainer's ``metrics.jsonl`` and ``summary.json`` (docs/running.md, 'What a run writes')
and Hydra's ``.hydra/config.yaml``; a clone of an experiment's run holds ``summary.json`` and the kept rows of its
metrics (``metrics_kept.jsonl``, ``checkfree.run.runlog.keep_metrics``) instead. Any of them may be missing or cut
short: a killed run is analysed from what is left, and a run without a single metrics record is reported as a
*missing point*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from checkfree.run.config import finite
from checkfree.run.rundir import reported_status
from checkfree.run.runlog import KEPT_METRICS, SkippedLines, run_metrics

# Table/plot order: the method under study first, then baselines, ablations, and the failure-free run.
STRATEGY_ORDER = ["checkfree", "checkfree_plus", "checkpoint", "redundant", "copy", "uniform", "random",
                  "zero", "none"]
NO_FAILURE = "none"
Curve = list[tuple[float, float]]
RUN_COLUMNS = ["run_dir", "strategy", "failure", "hourly_rate", "seed", "status", "missing", "incomplete",
               "error", "iterations", "n_failures", "n_recoveries", "lost_iterations", "final_val_loss",
               "time_to_target_s", "target_loss", "total_sim_time_s", "curve", "failure_times", "replicas",
               "node_losses", "stage_losses", "adjacent_stage_losses", "resyncs"]
TABLE_COLUMNS = ["strategy", "hourly_rate", "n_seeds", "n_missing", "n_reached", "reached_frac", "ttt_mean_s",
                 "ttt_std_s", "ttt_mean_h", "ttt_std_h", "final_val_loss_mean", "final_val_loss_std",
                 "failures_mean", "stage_losses_mean"]


# ----------------------------------------------------------------------------------------------- loading

def _natural_key(path: Path) -> list[Any]:
    # Sweep subdirectories are 0/, 1/, ..., 10/: sort 10 after 9, not after 1.
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(path))]


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("metrics.jsonl", KEPT_METRICS, "summary.json",
                                                     ".hydra/config.yaml"))


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory under ``paths``; a run's own subdirectories are not searched further."""
    found: list[Path] = []
    for root in map(Path, paths):
        for dirpath, dirnames, _ in os.walk(root):
            if _is_run_dir(Path(dirpath)):
                found.append(Path(dirpath))
                dirnames.clear()  # checkpoints/wandb dirs inside a run are not runs of their own
    return sorted(set(found), key=_natural_key)


def _read_mapping(path: Path) -> dict[str, Any]:
    """summary.json or .hydra/config.yaml as a dict; {} if absent or unreadable (with a warning)."""
    if not path.is_file():
        return {}
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(path)
            try:
                data = OmegaConf.to_container(cfg, resolve=True)
            except Exception:  # ${hydra:...} and friends only resolve inside a Hydra job
                data = OmegaConf.to_container(cfg, resolve=False)
    except Exception as exc:  # a half-written file must not stop the whole analysis
        warnings.warn(f"{path}: unreadable ({exc}); ignoring it", RuntimeWarning, stacklevel=2)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"{path}: a JSON {type(data).__name__}, not an object; ignoring it", RuntimeWarning,
                      stacklevel=2)
        return {}
    return data


NUMBERS = ("hourly_rate", "iterations", "n_failures", "n_recoveries", "lost_iterations", "initial_val_loss",
           "final_val_loss", "time_to_target_s", "target_loss", "total_sim_time_s", "replicas", "node_losses",
           "stage_losses", "adjacent_stage_losses", "resyncs")
"""Summary fields the tables compute with: a number or null, or the field is ignored (with a warning)."""
TEXTS = ("strategy", "failure", "status", "error")
"""Summary fields the tables print or compare as text."""


def _typed(summary: dict[str, Any], path: Path) -> dict[str, Any]:
    """``summary`` without the fields of a wrong type (a hand-edited or foreign summary.json), each named in a
    warning, so that one odd file never stops the analysis of the others."""
    bad = [k for k in NUMBERS if summary.get(k) is not None and not _finite_number(summary[k])
           and not (isinstance(summary[k], float) and math.isnan(summary[k]))]
    bad += [k for k in TEXTS if summary.get(k) is not None and not isinstance(summary[k], str)]
    bad += ["seed"] if summary.get("seed") is not None and not (isinstance(summary["seed"], int)
                                                                and not isinstance(summary["seed"], bool)) else []
    for key in bad:
        warnings.warn(f"{path}: {key}={summary[key]!r} is not a {'text' if key in TEXTS else 'number'}; ignoring "
                      "it", RuntimeWarning, stacklevel=2)
    return {k: v for k, v in summary.items() if k not in bad}


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and finite(x)


def _list(x: Any) -> list:
    """A record's list field (failed_stages, recoveries), or none when it is absent or not a list."""
    return x if isinstance(x, list) else []


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):  # None, or an unresolved ${...} interpolation from a Hydra config
        return math.nan


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """One run as a flat dict (see ``load_runs`` for the keys)."""
    run_dir = Path(run_dir)
    records = run_metrics(run_dir, bad="warn")
    summary = _typed(_read_mapping(run_dir / "summary.json"), run_dir / "summary.json")
    # The summary's own fields win, then its resolved config, then Hydra's copy of the config.
    cfg = summary.get("config")
    cfg = cfg if isinstance(cfg, dict) else _read_mapping(run_dir / ".hydra" / "config.yaml")

    curve: Curve = []
    failure_times: list[float] = []
    for rec in records:
        t = rec.get("sim_time_s")
        if not _finite_number(t):
            continue
        if _finite_number(rec.get("val_loss")):
            curve.append((float(t), float(rec["val_loss"])))
        # One entry per lost stage, stamped with the end of the iteration it was lost in.
        failure_times.extend(float(t) for _ in _list(rec.get("failed_stages")))
    if _finite_number(summary.get("initial_val_loss")) and not any(t == 0.0 for t, _ in curve):
        curve.insert(0, (0.0, float(summary["initial_val_loss"])))  # evaluated before iteration 1
    last = records[-1] if records else {}
    recoveries = [r for rec in records for r in _list(rec.get("recoveries")) if isinstance(r, dict)]

    # The trainer logs the initial evaluation as iteration 0: a run with nothing after it never trained.
    missing = not any(_float(rec.get("iteration", 1)) > 0 for rec in records)
    status = reported_status(run_dir, summary.get("status")) or ("missing" if missing else "incomplete")
    target = _first(summary.get("target_loss"), _get(cfg, "trainer.target_loss"))
    return {
        "run_dir": str(run_dir),
        "strategy": _first(summary.get("strategy"), _get(cfg, "strategy.name")) or "unknown",
        "failure": _first(summary.get("failure"), _get(cfg, "failure.name")),
        # failure=none keeps its config's hourly_rate, but no failure is ever drawn: its rate is 0.
        "hourly_rate": 0.0 if _first(summary.get("failure"), _get(cfg, "failure.name")) == "none"
        else _float(_first(summary.get("hourly_rate"), _get(cfg, "failure.hourly_rate"))),
        "seed": _first(summary.get("seed"), _get(cfg, "seed")),
        "status": status,
        "missing": missing,
        "incomplete": status != "completed",  # no summary, stopped on an error, interrupted or running
        "error": summary.get("error"),
        "iterations": _first(summary.get("iterations"), last.get("iteration"), 0),
        "n_failures": _first(summary.get("n_failures"), len(failure_times)),
        "n_recoveries": _first(summary.get("n_recoveries"), len(recoveries)),
        "lost_iterations": _first(summary.get("lost_iterations"),
                                  sum(int(r.get("lost_iterations") or 0) for r in recoveries)),
        "final_val_loss": _first(summary.get("final_val_loss"), curve[-1][1] if curve else None, math.nan),
        "time_to_target_s": _first(summary.get("time_to_target_s"),
                                   time_to_target(curve, target) if target is not None else None),
        "target_loss": target,
        "total_sim_time_s": _first(summary.get("total_sim_time_s"), last.get("sim_time_s"), math.nan),
        "curve": curve,
        "failure_times": failure_times,
        # Nodes, not stages (summaries before them: one node a stage, every failure a stage lost).
        "replicas": _first(summary.get("replicas"), _get(cfg, "engine.replicas"), 1),
        "node_losses": _first(summary.get("node_losses"), summary.get("n_failures"), len(failure_times)),
        "stage_losses": _first(summary.get("stage_losses"), summary.get("n_recoveries"), len(recoveries)),
        "adjacent_stage_losses": summary.get("adjacent_stage_losses"),
        "resyncs": _first(summary.get("resyncs"), 0),
    }


def load_runs(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run directory found under ``paths``.

    Columns: run_dir, strategy, failure, hourly_rate, seed, status ("completed", "error", "interrupted",
    "running"; "killed" for a summary that says running in a directory no process holds; "incomplete" without summary.json; "missing" without any metrics), missing (no training
    iteration logged: a missing point), incomplete (status is not "completed"),
    error, iterations, n_failures, n_recoveries, lost_iterations, final_val_loss, time_to_target_s (as the
    trainer computed it), target_loss, total_sim_time_s, curve (list of (sim_time_s, val_loss)) and
    failure_times (sim_time_s of each lost stage).
    """
    df = pd.DataFrame([load_run(d) for d in find_run_dirs(paths)], columns=RUN_COLUMNS)
    df[["missing", "incomplete"]] = df[["missing", "incomplete"]].astype(bool)
    try:  # keep seeds integral even when a missing point has none (plain int columns cannot hold NA)
        df["seed"] = pd.to_numeric(df["seed"]).astype("Int64")
    except (TypeError, ValueError):
        pass
    for col in ("hourly_rate", "final_val_loss", "total_sim_time_s", "time_to_target_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


# ------------------------------------------------------------------------------------------------ tables

def time_to_target(curve: Iterable[tuple[float, float]], target: float | None) -> float | None:
    """First simulated time at which the validation loss is <= ``target``; None if never (or no target)."""
    if target is None:
        return None
    return next((float(t) for t, loss in sorted(curve) if loss <= target), None)


def resolve_target(df: pd.DataFrame, target: float | None = None) -> tuple[float | None, str]:
    """The target loss for a comparison and a sentence saying where it came from.

    In order: the explicit ``target``; the runs' configured ``trainer.target_loss`` (the largest if they
    disagree); the largest final validation loss of the failure-free ``none`` runs (so every one of them
    reaches it); the 75th percentile of the runs' best validation losses (about 3 in 4 runs reach it).
    """
    if target is not None:
        return float(target), f"target loss {target:g} (given explicitly)"
    configured = sorted({float(t) for t in df["target_loss"] if _finite_number(t)})
    if configured:
        note = " (the largest of the configured targets " + ", ".join(f"{t:g}" for t in configured) + ")"
        return configured[-1], f"target loss {configured[-1]:g} from trainer.target_loss" + (
            note if len(configured) > 1 else "")
    live = df[~df["missing"]]
    none_final = live.loc[live["strategy"] == NO_FAILURE, "final_val_loss"].dropna()
    if len(none_final):
        t = float(np.max(none_final))
        return t, f"target loss {t:.4g} = the highest final val loss of the `{NO_FAILURE}` (no-failure) runs"
    best = [min(loss for _, loss in c) for c in live["curve"] if c]
    if best:
        t = float(np.percentile(best, 75))
        return t, f"target loss {t:.4g} = 75th percentile of the runs' lowest val losses (no target given)"
    return None, "no target loss: none given, none configured and no validation losses recorded"


def _strategy_rank(name: str) -> tuple[int, str]:
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER), name)


def _color(strategy: str) -> str:
    return f"C{_strategy_rank(strategy)[0] % 10}"  # the same colour for a strategy in every plot


def comparison_table(df: pd.DataFrame, target: float | None = None) -> pd.DataFrame:
    """One row per (strategy, hourly_rate): time-to-target statistics over seeds and speed-ups.

    Time to target is censored: runs that never reach the target count as not reached (``reached_frac``)
    and the ``ttt_*`` statistics are over the runs that did. Std is the sample std (ddof=1). Speed-up vs X
    = mean ttt of X / mean ttt of the strategy, X at the same hourly rate (``none`` runs pooled over all
    rates, since they inject no failures). ``table.attrs`` holds ``target`` and ``target_note``.
    """
    target, note = resolve_target(df, target)
    df = df.assign(ttt_s=pd.to_numeric(pd.Series([time_to_target(c, target) for c in df["curve"]],
                                                 index=df.index, dtype=object), errors="coerce"))
    rows = []
    for (strategy, rate), group in df.groupby(["strategy", "hourly_rate"], dropna=False, sort=False):
        runs = group[~group["missing"]]
        reached = runs["ttt_s"].dropna()
        rows.append({
            "strategy": strategy, "hourly_rate": rate, "n_seeds": len(runs),
            "n_missing": int(group["missing"].sum()), "n_reached": len(reached),
            "reached_frac": len(reached) / len(runs) if len(runs) else math.nan,
            "ttt_mean_s": reached.mean(), "ttt_std_s": reached.std(),
            "ttt_mean_h": reached.mean() / 3600, "ttt_std_h": reached.std() / 3600,
            "final_val_loss_mean": runs["final_val_loss"].mean(), "final_val_loss_std": runs["final_val_loss"].std(),
            "failures_mean": pd.to_numeric(runs["n_failures"], errors="coerce").mean(),
            "stage_losses_mean": pd.to_numeric(runs["stage_losses"], errors="coerce").mean(),
        })
    rows.sort(key=lambda r: (_strategy_rank(r["strategy"]), np.nan_to_num(r["hourly_rate"], nan=np.inf)))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    none_ttt = df.loc[(df["strategy"] == NO_FAILURE) & ~df["missing"], "ttt_s"].mean()
    for ref in ("checkpoint", "redundant", NO_FAILURE):
        if ref == NO_FAILURE:
            ref_ttt = pd.Series(none_ttt, index=table.index, dtype=float)
        else:
            by_rate = table[table["strategy"] == ref].set_index("hourly_rate")["ttt_mean_s"]
            ref_ttt = table["hourly_rate"].map(by_rate).astype(float)
        table[f"speedup_vs_{ref}"] = ref_ttt / table["ttt_mean_s"].astype(float)
    table.attrs.update(target=target, target_note=note)
    return table


def _pm(mean: float, std: float, fmt: str) -> str:
    if pd.isna(mean):
        return "–"
    return format(mean, fmt) + ("" if pd.isna(std) else " ± " + format(std, fmt))


def _num(x: float, fmt: str) -> str:
    return "–" if pd.isna(x) else format(x, fmt)


def _has_text(x: Any) -> bool:
    return isinstance(x, str) and bool(x)  # pandas may hold a missing error as None or NaN


def _rate(rate: float) -> str:
    if pd.isna(rate):
        return "?"
    return "0 % (no failures)" if rate == 0 else f"{rate * 100:g} %"


def to_markdown(table: pd.DataFrame) -> str:
    """The comparison table as a Markdown table (no extra dependency)."""
    head = ["strategy", "hourly rate", "seeds", "missing", "reached", "time to target (s)", "time to target (h)",
            "final val loss", "failures", "speed-up vs checkpoint", "vs redundant", "vs none"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r["strategy"]), _rate(r["hourly_rate"]), str(r["n_seeds"]), str(r["n_missing"]),
                 f"{r['n_reached']}/{r['n_seeds']}", _pm(r["ttt_mean_s"], r["ttt_std_s"], ".1f"),
                 _pm(r["ttt_mean_h"], r["ttt_std_h"], ".3f"),
                 _pm(r["final_val_loss_mean"], r["final_val_loss_std"], ".4f"), _num(r["failures_mean"], ".1f"),
                 *(_num(r[f"speedup_vs_{ref}"], ".3f") for ref in ("checkpoint", "redundant", NO_FAILURE))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- plots

def _mean_curve(curves: list[Curve], n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    # Seeds are evaluated at different simulated times: interpolate each onto the span all of them cover.
    lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    if hi <= lo:
        return np.array([]), np.array([])
    grid = np.linspace(lo, hi, n)
    ys = [np.interp(grid, [t for t, _ in c], [v for _, v in c]) for c in curves]
    return grid, np.mean(ys, axis=0)


def plot_val_loss(df: pd.DataFrame, path: Path, target: float | None) -> Path:
    """Validation loss vs simulated hours: a panel per failure rate, thin seeds + thick mean per strategy.

    The failure-free ``none`` runs are drawn in every panel as the reference. Coloured ticks along the
    bottom mark the failures seen by each strategy's first seed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's (e.g. notebook) backend alone
    from matplotlib.transforms import blended_transform_factory

    live = df[~df["missing"] & (df["curve"].map(len) > 0)]
    rates = sorted(live.loc[live["strategy"] != NO_FAILURE, "hourly_rate"].dropna().unique()) or sorted(
        live["hourly_rate"].dropna().unique()) or [math.nan]
    strategies = sorted(live["strategy"].unique(), key=_strategy_rank)
    ncols = min(3, len(rates))
    nrows = math.ceil(len(rates) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.9 * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    grid_axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    axes = list(grid_axes.flat)
    for ax in axes[len(rates):]:
        ax.set_visible(False)
    for ax, rate in zip(axes, rates):
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        panel = live[(live["hourly_rate"] == rate) | (live["strategy"] == NO_FAILURE)]
        for k, strategy in enumerate(s for s in strategies if s in set(panel["strategy"])):
            runs = panel[panel["strategy"] == strategy].sort_values("seed", key=lambda s: pd.to_numeric(
                s, errors="coerce"))
            curves = [sorted(c) for c in runs["curve"]]
            style = dict(color=_color(strategy), ls="--" if strategy == NO_FAILURE else "-")
            for c in curves if len(curves) > 1 else []:
                ax.plot([t / 3600 for t, _ in c], [v for _, v in c], lw=0.6, alpha=0.35, **style)
            grid, mean = _mean_curve(curves) if len(curves) > 1 else (
                np.array([t for t, _ in curves[0]]), np.array([v for _, v in curves[0]]))
            ax.plot(grid / 3600, mean, lw=2, label=strategy, **style)
            fails = runs["failure_times"].iloc[0]
            if fails:
                ax.vlines(np.asarray(fails) / 3600, 0.01 + 0.025 * k, 0.03 + 0.025 * k, transform=trans,
                          color=_color(strategy), lw=0.8)
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1.2, label=f"target {target:.4g}")
        ax.set_title("no rate" if pd.isna(rate) else f"hourly failure rate {_rate(rate)}")
        ax.set_xlabel("simulated wall-clock (h)")
        ax.set_yscale("log")  # the interesting part is close to the target, far below the initial loss
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("validation loss vs simulated wall-clock (thin: seeds, thick: mean over seeds; "
                 "ticks at the bottom: failures seen by each strategy's first seed)", fontsize=10)
    for row in grid_axes:
        row[0].set_ylabel("validation loss (log)")
    # One legend for the figure: each panel shows a subset of the strategies.
    labels: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    if labels:
        fig.legend(list(labels.values()), list(labels), loc="outside lower center",
                   ncols=min(len(labels), 6), fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def plot_time_to_target(table: pd.DataFrame, path: Path) -> Path:
    """Mean time to target (hours, ± std over the seeds that reached it) against the hourly failure rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for strategy, rows in table.groupby("strategy", sort=False):
        rows = rows.dropna(subset=["ttt_mean_h"]).sort_values("hourly_rate")
        if strategy == NO_FAILURE and len(rows):  # no failures injected: a reference level, not a curve
            ax.axhline(rows["ttt_mean_h"].mean(), color=_color(strategy), ls="--", label=f"{strategy} (no failures)")
        elif len(rows):
            ax.errorbar(rows["hourly_rate"] * 100, rows["ttt_mean_h"], yerr=rows["ttt_std_h"].fillna(0),
                        marker="o", capsize=3, color=_color(strategy), label=strategy)
    ax.set_xlabel("hourly failure rate (%)")
    ax.set_ylabel("time to target (simulated h)")
    ax.set_title(f"time to target loss {_num(table.attrs.get('target', math.nan), '.4g')}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------------ report

def write_report(df: pd.DataFrame, out_dir: str | Path, target: float | None = None) -> dict[str, Path]:
    """Write comparison.md, comparison.csv, val_loss_vs_time.png and time_to_target.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(df, target)
    target = table.attrs["target"]
    notes = [
        f"**Target:** {table.attrs['target_note']}. Time to target = first simulated time with val loss <= "
        "target.",
        "**Censoring:** runs that never reach the target are counted in `reached` only; time-to-target mean "
        "± std (sample std, ddof=1) is over the runs that reached it, so a strategy that rarely reaches the "
        "target can look faster than it is.",
        "**Speed-up vs X** = mean time to target of X / that of the strategy, X at the same hourly rate; "
        f"`{NO_FAILURE}` (no failures injected) is pooled over all rates. > 1 means faster than X.",
    ]
    incomplete = df[df["incomplete"] & ~df["missing"]]
    if len(incomplete):
        notes.append("**Incomplete runs** (not `completed`; analysed from the metrics they wrote): " + ", ".join(
            f"`{r.run_dir}` ({r.status}{': ' + r.error if _has_text(r.error) else ''})"
            for r in incomplete.itertuples()))
    shown = _num(math.nan if target is None else target, ".4g")
    md = [f"# Recovery strategy comparison\n\nTarget validation loss: **{shown}**\n", to_markdown(table), "",
          *[f"* {n}" for n in notes]]
    missing = df[df["missing"]]
    md += ["", f"## Missing points ({len(missing)})", ""]
    md += [f"* {r.strategy} @ {_rate(r.hourly_rate)}, seed {'?' if pd.isna(r.seed) else r.seed}: `{r.run_dir}` — "
           f"status {r.status}" + (f", error: {r.error}" if _has_text(r.error) else ", no metrics recorded")
           for r in missing.itertuples()] or ["None."]
    paths = {"markdown": out / "comparison.md", "csv": out / "comparison.csv",
             "val_loss_vs_time": out / "val_loss_vs_time.png", "time_to_target": out / "time_to_target.png"}
    paths["markdown"].write_text("\n".join(md) + "\n")
    table.to_csv(paths["csv"], index=False)
    plot_val_loss(df, paths["val_loss_vs_time"], target)
    plot_time_to_target(table, paths["time_to_target"])
    return paths


class OneLineParser(argparse.ArgumentParser):
    """A bad argument as one sentence on stderr (exit 2), not a usage block followed by the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see --help.\n")


def _loss(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is a validation loss, a number > 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a bad directory)."""
    parser = OneLineParser(prog="python -m checkfree.analysis", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: DIR/analysis)")
    parser.add_argument("--target", type=_loss, default=None, help="target validation loss")
    args = parser.parse_args(argv)
    bad = [str(d) for d in args.dirs if not d.is_dir()]
    if bad:
        print(f"error: not a directory: {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(f"error: --out={args.out} is invalid: it is a file; allowed is a directory (made if missing)",
              file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedLines)
        df = load_runs(args.dirs)
    skipped = [w.message for w in caught if isinstance(w.message, SkippedLines)]
    for other in (w for w in caught if not isinstance(w.message, SkippedLines)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if skipped:  # torn last lines of killed runs: one line for all of them
        print(f"note: skipped {sum(w.count for w in skipped)} unparsable metrics line(s) in {len(skipped)} run(s) "
              f"(first: {skipped[0].first})", file=sys.stderr)
    if df.empty:
        print(f"error: no run directories (metrics.jsonl, {KEPT_METRICS}, summary.json or .hydra/config.yaml) under "
              f"{', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    paths = write_report(df, args.out or args.dirs[0] / "analysis", args.target)
    print(paths["markdown"].read_text())
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
