"""checkfree.analysis on hand-made run directories whose time-to-target numbers are known exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from checkfree.analysis import comparison_table, load_runs, main, resolve_target, time_to_target, write_report

REPO = Path(__file__).resolve().parents[1]
TARGET = 3.0


def _hydra_config(run: Path, strategy: str, rate: float, seed: int, target: float | None) -> dict:
    cfg = {"seed": seed, "strategy": {"name": strategy}, "failure": {"name": "poisson", "hourly_rate": rate},
           "trainer": {"target_loss": target, "iterations": 10}}
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    # JSON is valid YAML, so this is what OmegaConf would read from a real Hydra output dir.
    (run / ".hydra" / "config.yaml").write_text(json.dumps(cfg))
    return cfg


def make_run(run: Path, strategy: str, rate: float, seed: int, evals: list[tuple[float, float]],
             failures: tuple[float, ...] = (), summary: bool = True, truncated: bool = False,
             target: float | None = TARGET) -> None:
    """A run whose val losses are ``evals`` (sim_time_s, val_loss), with a train-only record between evals.

    Like the trainer, it logs the initial evaluation (val loss 7.0) as iteration 0 at sim time 0.
    """
    cfg = _hydra_config(run, strategy, rate, seed, target)
    lines, it = [json.dumps({"iteration": 0, "progress": 0, "sim_time_s": 0.0, "wall_time_s": 0.0, "val_loss": 7.0,
                             "failed_stages": [], "recoveries": [], "lr": [1e-3] * 4})], 0
    for t, loss in evals:
        for sim, val in ((t - 1.0, None), (t, loss)):
            it += 1
            rec = {"iteration": it, "progress": it, "sim_time_s": sim, "wall_time_s": 0.1 * it, "train_loss": 4.0,
                   "failed_stages": [1] if sim in failures else [], "recoveries": [], "lr": [1e-3] * 4,
                   "grad_norm": [1.0] * 4, "grad_norm_post": [1.0] * 4, "tokens": 1024}
            if val is not None:
                rec["val_loss"] = val
            lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n" + ('{"iteration": 99, "sim_ti' if truncated else "")
    (run / "metrics.jsonl").write_text(text)
    if summary:
        ttt = next((t for t, loss in evals if target is not None and loss <= target), None)
        (run / "summary.json").write_text(json.dumps({
            "status": "completed", "error": None, "strategy": strategy, "failure": "poisson", "hourly_rate": rate,
            "seed": seed, "model": "tiny", "iterations": it, "total_sim_time_s": evals[-1][0],
            "total_wall_time_s": 1.0, "n_failures": len(failures), "n_recoveries": len(failures),
            "lost_iterations": 0, "initial_val_loss": 7.0, "final_val_loss": evals[-1][1], "target_loss": target,
            "time_to_target_s": ttt, "iterations_to_target": None, "config": cfg}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    runs = [  # strategy, rate, seed, evals -> time to target 3.0
        ("checkfree", 0.1, 0, [(50, 3.5), (100, 3.0), (150, 2.8)]),  # 100
        ("checkfree", 0.1, 1, [(60, 3.4), (120, 2.9), (180, 2.7)]),  # 120
        ("redundant", 0.1, 0, [(150, 3.0), (200, 2.9)]),  # 150
        ("redundant", 0.1, 1, [(180, 2.95), (240, 2.85)]),  # 180
        ("checkpoint", 0.1, 0, [(100, 3.2), (200, 3.0), (300, 2.9)]),  # 200
        ("checkpoint", 0.1, 1, [(240, 2.99), (300, 2.95)]),  # 240
        ("none", 0.0, 0, [(80, 2.9), (160, 2.5)]),  # 80
        ("copy", 0.1, 0, [(300, 3.0)]),  # 300
    ]
    for i, (strategy, rate, seed, evals) in enumerate(runs):
        make_run(root / str(i), strategy, rate, seed, evals, failures=(99.0,) if i == 0 else (),
                 truncated=(i == 1))
    make_run(root / "8", "copy", 0.1, 1, [(300, 3.1), (400, 3.05)], summary=False)  # killed hard, never reaches
    # Crashed before training: Hydra's config and an error summary, no metrics.
    _hydra_config(root / "9", "checkfree_plus", 0.1, 0, TARGET)
    (root / "9" / "summary.json").write_text(json.dumps({"status": "error", "error": "RuntimeError: boom"}))
    # Crashed in its first iteration: only the initial evaluation was logged -> also a missing point.
    make_run(root / "10", "uniform", 0.05, 0, [(0.0, 7.0)])
    (root / "10" / "metrics.jsonl").write_text((root / "10" / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    summary = json.loads((root / "10" / "summary.json").read_text())
    (root / "10" / "summary.json").write_text(json.dumps({**summary, "status": "error", "error": "ValueError: nan"}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _row(table: pd.DataFrame, strategy: str, rate: float = 0.1) -> pd.Series:
    rows = table[(table["strategy"] == strategy) & (table["hourly_rate"] == rate)]
    assert len(rows) == 1, (strategy, rate)
    return rows.iloc[0]


def test_time_to_target_is_first_crossing() -> None:
    curve = [(30.0, 2.5), (10.0, 3.5), (20.0, 3.0)]
    assert time_to_target(curve, 3.0) == 20.0
    assert time_to_target(curve, 2.0) is None
    assert time_to_target(curve, None) is None
    assert time_to_target([], 3.0) is None


def test_load_runs(sweep: Path) -> None:
    with pytest.warns(RuntimeWarning, match="unparsable"):
        df = load_runs([sweep])
    assert list(df["run_dir"]) == [str(sweep / str(i)) for i in range(11)]
    first = df.iloc[0]
    assert (first["strategy"], first["hourly_rate"], first["seed"], first["status"]) == ("checkfree", 0.1, 0, "completed")
    assert first["curve"] == [(0.0, 7.0), (50.0, 3.5), (100.0, 3.0), (150.0, 2.8)]
    assert first["failure_times"] == [99.0] and first["n_failures"] == 1
    assert df.iloc[1]["iterations"] == 6  # the truncated 7th line is skipped
    killed = df.iloc[8]  # no summary.json: everything comes from metrics.jsonl and .hydra/config.yaml
    assert (killed["strategy"], killed["seed"], killed["status"], killed["target_loss"]) == ("copy", 1, "incomplete", 3.0)
    assert killed["incomplete"] and not killed["missing"]
    assert (killed["final_val_loss"], killed["total_sim_time_s"], killed["iterations"]) == (3.05, 400.0, 4)
    assert math.isnan(killed["time_to_target_s"])
    crashed = df.iloc[9]
    assert crashed["missing"] and crashed["status"] == "error" and crashed["error"] == "RuntimeError: boom"
    assert (crashed["strategy"], crashed["hourly_rate"], crashed["curve"]) == ("checkfree_plus", 0.1, [])
    assert df.iloc[10]["missing"] and df.iloc[10]["strategy"] == "uniform"


def test_comparison_table_numbers(sweep: Path) -> None:
    with pytest.warns(RuntimeWarning):
        table = comparison_table(load_runs([sweep]))
    assert table.attrs["target"] == 3.0
    assert list(table["strategy"]) == ["checkfree", "checkfree_plus", "checkpoint", "redundant", "copy", "uniform",
                                       "none"]
    cf = _row(table, "checkfree")
    assert (cf["n_seeds"], cf["n_missing"], cf["n_reached"], cf["reached_frac"]) == (2, 0, 2, 1.0)
    assert cf["ttt_mean_s"] == pytest.approx(110.0)
    assert cf["ttt_std_s"] == pytest.approx(math.sqrt(200.0))  # sample std of 100, 120
    assert cf["ttt_mean_h"] == pytest.approx(110.0 / 3600)
    assert cf["final_val_loss_mean"] == pytest.approx(2.75)
    assert cf["final_val_loss_std"] == pytest.approx(math.sqrt(0.005))
    assert cf["failures_mean"] == pytest.approx(0.5)
    assert cf["speedup_vs_checkpoint"] == pytest.approx(2.0)  # 220 / 110
    assert cf["speedup_vs_redundant"] == pytest.approx(1.5)  # 165 / 110
    assert cf["speedup_vs_none"] == pytest.approx(80 / 110)
    assert _row(table, "redundant")["speedup_vs_checkpoint"] == pytest.approx(4 / 3)  # 220 / 165
    assert _row(table, "checkpoint")["speedup_vs_checkpoint"] == pytest.approx(1.0)
    copy = _row(table, "copy")  # one seed never reaches the target: censored, mean over the one that did
    assert (copy["n_seeds"], copy["n_reached"], copy["reached_frac"], copy["ttt_mean_s"]) == (2, 1, 0.5, 300.0)
    assert math.isnan(copy["ttt_std_s"])
    plus = _row(table, "checkfree_plus")
    assert (plus["n_seeds"], plus["n_missing"]) == (0, 1) and math.isnan(plus["ttt_mean_s"])
    assert (_row(table, "uniform", 0.05)["n_seeds"], _row(table, "uniform", 0.05)["n_missing"]) == (0, 1)
    none = _row(table, "none", 0.0)
    assert none["ttt_mean_s"] == 80.0 and math.isnan(none["speedup_vs_checkpoint"])
    # An explicit target overrides the configured one: 2.9 -> checkfree at 150 and 120 s.
    with pytest.warns(RuntimeWarning):
        assert _row(comparison_table(load_runs([sweep]), 2.9), "checkfree")["ttt_mean_s"] == pytest.approx(135.0)


def test_default_target(sweep: Path) -> None:
    with pytest.warns(RuntimeWarning):
        df = load_runs([sweep])
    assert resolve_target(df, 2.0)[0] == 2.0
    df["target_loss"] = None
    target, note = resolve_target(df)
    assert target == 2.5 and "none" in note  # the highest final val loss of the no-failure runs
    without_none = df[df["strategy"] != "none"]
    target, note = resolve_target(without_none)
    mins = [2.8, 2.7, 2.9, 2.85, 2.9, 2.95, 3.0, 3.05]
    assert target == pytest.approx(pd.Series(mins).quantile(0.75)) and "75th" in note


def test_write_report(sweep: Path, tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning):
        df = load_runs([sweep])
    paths = write_report(df, tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "val_loss_vs_time", "time_to_target"}
    md = paths["markdown"].read_text()
    assert "| checkfree | 10 % | 2 | 0 | 2/2 | 110.0 ± 14.1 |" in md
    assert "target loss 3 from trainer.target_loss" in md and "Censoring" in md
    assert "## Missing points (2)" in md
    assert f"checkfree_plus @ 10 %, seed 0: `{sweep / '9'}` — status error, error: RuntimeError: boom" in md
    assert f"uniform @ 5 %, seed 0: `{sweep / '10'}` — status error, error: ValueError: nan" in md
    assert f"`{sweep / '8'}` (incomplete)" in md  # no summary.json: listed as incomplete
    csv = pd.read_csv(paths["csv"])
    assert csv.loc[csv["strategy"] == "checkfree", "speedup_vs_checkpoint"].item() == pytest.approx(2.0)
    assert csv.loc[csv["strategy"] == "checkfree_plus", "n_missing"].item() == 1
    for key in ("val_loss_vs_time", "time_to_target"):
        data = paths[key].read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_report_without_any_curves(tmp_path: Path) -> None:
    _hydra_config(tmp_path / "run", "checkfree", 0.05, 0, None)
    df = load_runs([tmp_path])
    table = comparison_table(df)
    assert table.attrs["target"] is None and table["n_missing"].tolist() == [1]
    paths = write_report(df, tmp_path / "out")
    assert paths["val_loss_vs_time"].read_bytes().startswith(b"\x89PNG")


def test_cli(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep), "--target", "3.0"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # The sweep's torn metrics lines: one note on stderr for all of them, no warning per line.
    assert captured.err.startswith("note: skipped ") and captured.err.count("\n") == 1
    assert "| checkfree | 10 % |" in out and f"wrote csv: {sweep / 'analysis' / 'comparison.csv'}" in out
    assert (sweep / "analysis" / "val_loss_vs_time.png").is_file()
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


def test_module_entry_point_rejects_missing_dir(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "checkfree.analysis", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_notebook_runs_headless(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from ipykernel.kernelspec import install

    # A private kernelspec that runs *this* interpreter: works in a fresh venv with no kernel installed
    # and is not shadowed by a user-level "python3" kernel pointing at some other Python.
    install(kernel_name="checkfree-test", prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("CHECKFREE_RUNS", str(sweep))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells)  # committed with outputs cleared
    client = nbclient.NotebookClient(nb, kernel_name="checkfree-test", timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    for name in ("comparison.md", "comparison.csv", "val_loss_vs_time.png", "time_to_target.png"):
        assert (sweep / "analysis" / name).is_file(), name
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_a_run_kept_in_git_loads_as_the_run_did(sweep: Path, tmp_path: Path) -> None:
    """An experiment's run directory keeps summary.json and metrics_kept.jsonl in git: a clone (no
    metrics.jsonl, no .hydra) loads to the same row, curve and failure marks as the run's full directory."""
    from checkfree.run.runlog import KEPT_METRICS, keep_metrics, read_metrics, run_metrics

    full = sweep / "0"  # checkfree seed 0: 3 validations, a stage lost at 99 s
    kept = keep_metrics(full)
    records = read_metrics(full / "metrics.jsonl")
    # The first and last records, every validation, every lost stage: 7 records -> 5 (two train-only ones go).
    assert [r["iteration"] for r in read_metrics(kept)] == [0, 2, 3, 4, 6]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    clone = tmp_path / "clone" / "0"
    clone.mkdir(parents=True)
    for name in ("summary.json", KEPT_METRICS):
        (clone / name).write_text((full / name).read_text())
    assert run_metrics(clone) == read_metrics(kept) and run_metrics(full) == records
    a, b = load_runs([full]).iloc[0], load_runs([clone]).iloc[0]
    for column in ("strategy", "hourly_rate", "seed", "status", "iterations", "n_failures", "final_val_loss",
                   "time_to_target_s", "total_sim_time_s", "curve", "failure_times"):
        assert a[column] == b[column], column
    assert b["curve"] == [(0.0, 7.0), (50.0, 3.5), (100.0, 3.0), (150.0, 2.8)] and b["failure_times"] == [99.0]
    assert keep_metrics(sweep / "9") is None  # crashed before training: no metrics, nothing to keep


def test_garbage_run_directories_are_named_in_warnings_and_never_stop_the_report(
        sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A summary field of the wrong type, failed_stages or recoveries that are not lists, a summary that is a
    JSON list: each is named in a warning and left out; every other run is reported as before. --out onto a
    file is refused in one line, exit 2."""
    garbage = tmp_path / "garbage"
    make_run(garbage / "a", "checkfree", 0.1, 0, [(50, 3.5), (100, 3.0)])
    summary = json.loads((garbage / "a" / "summary.json").read_text())
    (garbage / "a" / "summary.json").write_text(json.dumps({**summary, "n_failures": "three", "seed": [0],
                                                            "strategy": 7, "final_val_loss": "low"}))
    make_run(garbage / "b", "checkpoint", 0.1, 0, [(50, 3.5), (100, 3.0)])
    lines = (garbage / "b" / "metrics.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "failed_stages": 2, "recoveries": "none"})
    (garbage / "b" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    make_run(garbage / "c", "redundant", 0.1, 0, [(50, 3.5), (100, 3.0)])
    (garbage / "c" / "summary.json").write_text("[1, 2]")
    with pytest.warns(RuntimeWarning) as caught:
        df = load_runs([garbage])
    messages = [str(w.message) for w in caught]
    assert any("n_failures='three' is not a number" in m for m in messages)
    assert any("strategy=7 is not a text" in m for m in messages)
    assert any("seed=[0] is not a number" in m for m in messages)
    assert any(m.endswith("summary.json: a JSON list, not an object; ignoring it") for m in messages)
    rows = df.set_index(df.run_dir.map(lambda d: Path(d).name))
    assert rows.loc["a", "strategy"] == "checkfree"  # from its config, where the summary's field was odd
    assert rows.loc["a", "n_failures"] == 0 and rows.loc["b", "n_failures"] == 0
    assert rows.loc["c", "strategy"] == "redundant" and rows.loc["c", "status"] == "incomplete"
    assert main([str(garbage), "--out", str(tmp_path / "report")]) == 0
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main([str(sweep), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out={tmp_path / 'file'} is invalid: it is a file; allowed is a directory (made if missing)\n"
