"""Table 2 in the paper's units: the paper clock's prices, and the comparison's statistics on hand-made runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from checkfree.reports import table2
from checkfree.simulation.paper_table2 import ITERATION_S as TABLE2_ITERATION_S
from checkfree.simulation.paper_table2 import RECOVERY_S as PAPER_RECOVERY_S
from checkfree.simulation.paper_table2 import iteration_seconds as table2_iteration_seconds
from tests.scripts import experiment

ROOT = Path(__file__).resolve().parent.parent


def test_paper_clock_prices_each_strategy_as_the_paper_measured(small_run, tmp_path):
    """Each CPU iteration stands for 10,000 / T paper iterations at the strategy's Table 2 price; a recovery
    costs the paper's 30 s; checkpoint saves and replica refreshes are inside the iteration time."""
    from checkfree.train import train

    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"iteration": 2, "stage": 1}]))
    seconds = {}
    for name in ("checkfree", "checkpoint", "redundant"):
        summary = train(small_run(strategy={"name": name, "every": 2}, failure={"name": "trace", "path": str(trace)},
                                  trainer={"iterations": 3, "clock": "paper_table2", "paper_T": 200}), tmp_path / name)
        seconds[name] = summary["iteration_sim_s"]
        assert summary["recovery_sim_s"] == PAPER_RECOVERY_S and summary["overhead_sim_s"] == 0.0
        assert summary["total_sim_time_s"] == pytest.approx(3 * seconds[name] + PAPER_RECOVERY_S)
    # small_run's failure.hourly_rate is 0.10: the 10 % column.
    assert seconds == pytest.approx({"checkfree": 50 * 91.32, "checkpoint": 50 * 91.35, "redundant": 50 * 151.04})
    assert table2_iteration_seconds("checkfree", 0.16) == 92.12 and table2_iteration_seconds("checkfree", 0.0) == 91.32


def fake_run(root: Path, strategy: str, rate: float, seed: int, hours: float | None, iterations: int,
             failure_hours: list[float], T: int = 100, n_stages: int = 6, lost: int = 0,
             held: list[int] | None = None) -> None:
    run = root / f"{strategy}_{rate}_{seed}"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "sim_time_s": 0.0, "val_loss": 5.0}) + "\n")
    ttt = hours * 3600 if hours is not None else None
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "strategy": strategy, "seed": seed, "failure": "poisson", "hourly_rate": rate,
        "iterations": iterations, "time_to_target_interp_s": ttt,
        "iterations_to_target_interp": iterations if hours is not None else None,
        "total_sim_time_s": 999 * 3600.0, "n_recoveries": len(failure_hours),
        "failures": [{"stage": 1, "time_s": h * 3600} for h in failure_hours],
        "final_val_loss_se": 0.004, "val_sequences": 512, "target_loss": 0.78, "lost_iterations": lost,
        "memory_overhead_bytes_per_node": held or [0] * n_stages,
        "config": {"trainer": {"paper_T": T}, "model": {"n_stages": n_stages}}}))


def test_comparison_means_cis_paired_speedups_and_failure_counts(tmp_path):
    # Three seeds per strategy at 16 %; checkpointing 300/330/270 h, CheckFree 200/220/190 h.
    for seed, (ckpt, cf) in enumerate([(300.0, 200.0), (330.0, 220.0), (270.0, 190.0)]):
        fake_run(tmp_path, "checkpoint", 0.16, seed, ckpt, 250, [10.0, 280.0, 400.0])
        fake_run(tmp_path, "checkfree", 0.16, seed, cf, 150, [10.0, 180.0, 250.0])
    fake_run(tmp_path, "redundant", 0.16, 0, None, 400, [1.0] * 24)  # never reached the target
    # A baseline the paper did not run: no paper columns; its lost iterations and its busiest node's copies.
    for seed, lost in enumerate((3, 5)):
        fake_run(tmp_path, "memory_checkpoint", 0.16, seed, 250.0, 120, [10.0], lost=lost,
                 held=[2_000_000, 3_500_000, 0, 0, 0, 0])
    runs = table2.load([tmp_path])
    table = table2.comparison(runs).set_index("strategy")

    cf = table.loc["checkfree"]
    assert cf["hours_to_target"] == pytest.approx(610 / 3)
    t = 4.303  # Student t, 2 degrees of freedom
    sd = math.sqrt(sum((x - 610 / 3) ** 2 for x in (200, 220, 190)) / 2)
    assert cf["hours_ci95"] == pytest.approx(t * sd / math.sqrt(3))
    assert cf["iterations_to_target_over_T"] == pytest.approx(1.5)
    # Hours over the no-failure time, as the paper's column: 10,000 iterations of 92.12 s at 16 %.
    assert cf["time_over_T"] == pytest.approx(610 / 3 * 3600 / (92.12 * 10_000))
    assert cf["failures_before_target"] == pytest.approx(2.0)  # 10 h and 180 h are before 190..220 h
    assert cf["failures_per_stage_per_T"] == pytest.approx(3 / 6 / 1.5)
    ratios = [300 / 200, 330 / 220, 270 / 190]
    assert cf["speedup_vs_checkpoint"] == pytest.approx(sum(ratios) / 3)
    assert cf["speedup_vs_checkpoint_ci95"] == pytest.approx(table2.ci95(ratios))
    assert (cf["paper_hours_to_target"], cf["paper_speedup_vs_checkpoint"]) == (562.96, 1.13)
    # 10 h and 280 h are before 300 h and 330 h; only 10 h is before 270 h.
    assert table.loc["checkpoint", "failures_before_target"] == pytest.approx(5 / 3)

    red = table.loc["redundant"]
    assert (red["seeds"], red["reached"]) == (1, 0) and math.isnan(red["hours_to_target"])
    assert red["failures_per_stage_per_T"] == pytest.approx(24 / 6 / 4)
    assert math.isnan(cf["speedup_vs_redundant"])  # no redundant run reached the target to pair with

    mem = table.loc["memory_checkpoint"]
    assert mem["lost_iterations"] == 4.0 and mem["memory_overhead_mb_per_node"] == 3.5
    assert math.isnan(mem["paper_hours_to_target"]) and math.isnan(mem["paper_iterations_over_T"])
    assert mem["speedup_vs_checkpoint"] == pytest.approx((300 / 250 + 330 / 250) / 2)  # seeds 0 and 1 paired
    assert (cf["lost_iterations"], cf["memory_overhead_mb_per_node"]) == (0.0, 0.0)

    out = tmp_path / "report"
    table2.write_report([tmp_path], out, {"T": 100, "target": 0.78, "iterations": [95, 105], "seeds": 2})
    csv = (out / "comparison.csv").read_text().splitlines()
    assert csv[0].startswith("strategy,hourly_rate,seeds,reached,hours_to_target,hours_ci95,iterations_to_target_over_T")
    report = (out / "comparison.md").read_text()
    assert "| checkfree | 16% | 3/3 | 203 ± " in report
    assert "| memory_checkpoint | 16% | 2/2 | 250 ± 0 | — | " in report and report.count("| 4 | 3.50 |") == 1
    assert (out / "val_loss_vs_hours.png").stat().st_size > 0
    # These hand-made summaries carry no environment record: the report says so, once, for every run.
    assert report.startswith("Environment of all 9 runs: not recorded (made before summaries carried")
    # Written where the runs are (as the experiments do), runs.csv names them relative to it: the same file
    # from any clone.
    table2.write_report([tmp_path], tmp_path, {"T": 100, "target": 0.78, "iterations": [95, 105], "seeds": 2})
    dirs = pd.read_csv(tmp_path / "runs.csv").run_dir
    assert len(dirs) == 9 and all((tmp_path / d / "summary.json").is_file() and not d.startswith("/") for d in dirs)


def test_gpu_throughput_benchmark_smoke_mode_runs_on_the_cpu(capsys):
    """The benchmark's own code path (in this process: the interpreter and torch are already up)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = gpu_throughput.main(["--smoke"])
    assert [(r["schedule"], r["fused"]) for r in rows] == [
        ("in_order", False), ("in_order", True), ("out_of_order", False), ("out_of_order", True)]
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["mfu"] is None for r in rows)  # no peak for a CPU
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| in_order", "| out_"))]
    assert len(table) == 4


def test_ablation_rows_pair_each_rule_with_checkfree_by_seed(tmp_path):
    """The ablation table on hand-made runs: loss at T interpolated between validations, the last loss, the
    difference to CheckFree's last loss at the same seed, and every run's own figures."""
    script = experiment("table2")
    # val loss at iterations 0 / 100 / 125 per (rule, seed); T = 100 -> "at T" is the 100 record.
    finals = {("checkfree", 0): 0.80, ("checkfree", 1): 0.90, ("copy", 0): 0.85, ("copy", 1): 0.99,
              **{(rule, seed): 1.5 for rule in ("uniform", "random", "zero") for seed in (0, 1)}}
    runs = []
    for (rule, seed), last in finals.items():
        run = tmp_path / f"{rule}_{seed}"
        run.mkdir()
        curve = [(0, 5.0), (50, 2.0), (150, last)]  # at T=100: halfway, (2.0 + last) / 2
        (run / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "val_loss": v}) + "\n"
                                                   for i, v in curve))
        runs.append({"run_dir": str(run), "strategy": rule, "seed": seed, "n_failures": 10 + seed,
                     "n_recoveries": 10 + seed, "iterations": 150, "total_wall_time_s": 60.0,
                     "iterations_to_target_interp": 120.0 if rule == "checkfree" else None})
    rows, records = script.ablation_rows(64, {"T": 100}, runs)
    cf = next(r for r in rows if "| checkfree |" in r)
    copy = next(r for r in rows if "| copy |" in r)
    cells = [c.strip() for c in copy.split("|")[1:-1]]
    assert cells[:3] == ["64", "100", "copy"]
    assert cells[4].startswith(f"{((2.0 + 0.85) / 2 + (2.0 + 0.99) / 2) / 2:.4f} ± ")
    assert cells[6].startswith(f"+{((0.85 - 0.80) + (0.99 - 0.90)) / 2:.4f} ± ")  # paired: +0.05, +0.09
    assert cells[7:] == ["0/2", "—"]
    assert [c.strip() for c in cf.split("|")[1:-1]][6:] == ["—", "2/2", "1.20 ± 0.00"]
    assert [(r["rule"], r["seed"], r["val_loss_at_end"]) for r in records if r["rule"] in ("checkfree", "copy")] \
        == [("checkfree", 0, 0.80), ("checkfree", 1, 0.90), ("copy", 0, 0.85), ("copy", 1, 0.99)]
    assert len(records) == 10 and script.run_seconds(runs) == 600.0


def test_a_new_corpus_target_comes_from_the_no_failure_probe():
    """--target auto: the probe's loss after 500 iterations (rounded to 3 decimals) is the target."""
    script = experiment("table2")
    curve = [(0, 5.0), (450, 2.0), (550, 1.8), (1000, 1.5), (2000, 1.2345)]
    assert script.target_at(curve, script.TARGET_AT) == 1.9  # halfway between 2.0 and 1.8
    assert script.target_at(curve, 2000) == 1.234


def test_the_granularity_study_changes_the_tokens_per_iteration_alone():
    """A level: its micro-batch size, validations every T / 10 (50 iterations at 8 sequences, scaled), and the one
    target; a run's time to target / T is in the paper's units (hours over 10,000 paper iterations at the
    strategy's price at 16 %/h), whatever the level's T."""
    script = experiment("table2")
    assert script.level_overrides(8, 3.671, ["data=pydocs"]) == [
        "trainer.micro_batch_size=8", "trainer.eval_every=50", "trainer.target_loss=3.671", "data=pydocs"]
    assert script.level_overrides(2, 3.671, [])[:2] == ["trainer.micro_batch_size=2", "trainer.eval_every=200"]
    run = {"strategy": "checkfree", "seed": 1, "status": "completed", "n_failures": 40,
           "time_to_target_interp_s": 1_500_000.0, "iterations_to_target_interp": 3000.0}
    record = script.granularity_record(2, {"T": 2000}, run)
    paper_s = TABLE2_ITERATION_S["checkfree"][2]  # its 16 %/h column
    assert record["K"] == 5.0 and record["iterations_to_target_over_T"] == 1.5
    assert record["time_over_T"] == pytest.approx(1_500_000.0 / (paper_s * 10_000))
    assert script.granularity_record(2, {"T": 2000}, {"strategy": "checkfree"})["time_over_T"] is None


def test_the_extrapolation_to_k_1_is_a_least_squares_line_with_its_prediction_interval():
    script = experiment("table2")
    # Exactly on a line y = 2.2 - 0.035 K: no residual, no width.
    value, half, slope = script.extrapolate([(20, 1.5), (10, 1.85), (5, 2.025)])
    assert (value, half, slope) == (pytest.approx(2.165), pytest.approx(0.0, abs=1e-12), pytest.approx(-0.035))
    # Flat with spread: slope 0, residual s = sqrt(4 x 0.25 / 2); half-width t(2) s sqrt(1/4 + (1-15)^2 / 100).
    value, half, slope = script.extrapolate([(10, 1.0), (10, 2.0), (20, 1.0), (20, 2.0)])
    assert (value, slope) == (pytest.approx(1.5), pytest.approx(0.0))
    assert half == pytest.approx(4.303 * math.sqrt(0.5) * math.sqrt(0.25 + 196 / 100))


def test_the_granularity_report_says_per_level_how_far_each_strategy_got(tmp_path):
    script = experiment("table2")
    calibrations = {8: {"T": 500, "target": 3.671, "iterations": [490, 510]},
                    2: {"T": 2000, "target": 3.671, "iterations": [1990, 2010]}}
    frame = pd.DataFrame([
        {"micro_batch_size": 8, "strategy": "checkfree", "status": "completed", "time_over_T": 1.4},
        {"micro_batch_size": 8, "strategy": "checkfree", "status": "completed", "time_over_T": 1.6},
        {"micro_batch_size": 2, "strategy": "checkfree", "status": "completed", "time_over_T": 2.0},
        {"micro_batch_size": 2, "strategy": "checkfree", "status": "completed", "time_over_T": None},
        {"micro_batch_size": 2, "strategy": "checkpoint", "status": "running", "time_over_T": None}])
    text = script.granularity_report(frame, calibrations, ["checkfree", "checkpoint"])
    lines = text.splitlines()
    assert lines[0].startswith("| strategy | K = 20.0 (b = 8, T = 500) | K = 5.0 (b = 2, T = 2000) |")
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    # Points (20, 1.4), (20, 1.6), (5, 2.0): slope -5 / 150, the line through (15, 5/3) gives 2.133 at K = 1.
    assert cells[:4] == ["checkfree", "1.50 ± 1.27 (2/2)", "2.00 (1/2)", "-0.0333"]
    assert cells[4].startswith("2.13 ± ")
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["checkpoint", "not run yet", "0/1 runs finished", "—", "—"]


def test_each_point_gets_only_the_strategy_keys_its_strategy_reads():
    """regime() sets checkpointing's strategy.every for the whole grid; the other strategies would refuse it."""
    script = experiment("table2")
    extra = [*script.regime(480, 4.0), "data=pydocs", "+strategy.keep=3"]
    assert script.regime(480, 4.0) == ["trainer.paper_T=480", "++strategy.every=5", "++strategy.storage_every=5",
                                       "trainer.iterations=1920"]
    assert script.read_by(["strategy=memory_checkpoint", "seed=0"], extra) == extra
    assert script.read_by(["strategy=checkpoint", "seed=0"], extra) == [
        "trainer.paper_T=480", "++strategy.every=5", "trainer.iterations=1920", "data=pydocs", "+strategy.keep=3"]
    assert script.read_by(["strategy=checkfree_plus", "seed=0"], extra) == [
        "trainer.paper_T=480", "trainer.iterations=1920", "data=pydocs"]
    assert script.read_by(["seed=0"], extra) == extra  # the strategy is the config's: nothing to decide on


def test_every_strategy_but_redundant_computation_is_paired_with_it_by_seed(tmp_path):
    for seed, (red, ckpt, snap) in enumerate([(400.0, 300.0, 250.0), (440.0, None, 200.0)]):
        fake_run(tmp_path, "redundant", 0.16, seed, red, 110, [10.0])
        fake_run(tmp_path, "checkpoint", 0.16, seed, ckpt, 250, [10.0])
        fake_run(tmp_path, "snapshot_restore", 0.16, seed, snap, 105, [10.0])
    table = table2.comparison(table2.load([tmp_path])).set_index("strategy")
    assert table.loc["snapshot_restore", "speedup_vs_redundant"] == pytest.approx((400 / 250 + 440 / 200) / 2)
    assert table.loc["checkpoint", "speedup_vs_redundant"] == pytest.approx(400 / 300)  # seed 1 never reached
    assert math.isnan(table.loc["redundant", "speedup_vs_redundant"])


def test_a_report_written_mid_sweep_leaves_out_the_runs_still_under_way_and_says_how_many(tmp_path):
    """A run under way (its process holds run.lock; iterations 0 when it has just started) is not a seed's
    result yet; the same summary with nobody holding the lock is a killed run, which counts as not reached."""
    from checkfree.run.rundir import owned

    for seed, hours in enumerate((200.0, 220.0)):
        fake_run(tmp_path, "checkfree", 0.16, seed, hours, 150, [10.0])
    fake_run(tmp_path, "checkfree", 0.16, 2, None, 0, [])
    under_way = tmp_path / "checkfree_0.16_2"
    summary = json.loads((under_way / "summary.json").read_text())
    (under_way / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    with owned(under_way, resume=False):
        runs = table2.load([tmp_path])
        assert sorted(runs.status) == ["completed", "completed", "running"]
        row = table2.comparison(runs).iloc[0]
        assert (row.seeds, row.reached, row.hours_to_target) == (2, 2, 210.0)
        table2.write_report([tmp_path], tmp_path / "report")
        assert "1 run(s) still running, left out of the table below." in (tmp_path / "report" / "comparison.md").read_text()
    killed = table2.load([tmp_path])
    assert sorted(killed.status) == ["completed", "completed", "killed"]
    # A killed run is a seed that did not reach the target; killed before its first iteration, it has no
    # failures per T to count.
    row = table2.comparison(killed).iloc[0]
    assert (row.seeds, row.reached, row.failures_per_stage_per_T) == (3, 2, pytest.approx(1 / 6 / 1.5))
    summary["iterations"] = 40
    (under_way / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    row = table2.comparison(table2.load([tmp_path])).iloc[0]
    assert (row.seeds, row.reached) == (3, 2)


def test_the_main_table_runs_at_one_other_width_and_refuses_several_before_any_run(tmp_path):
    """--widths 128: every run (calibration, grid, edge protocols) gets d_model 128 with heads of 16 dimensions;
    two widths at once are refused before the probe or any run starts (nothing is written)."""
    script = experiment("table2")
    assert script.model_width(128) == ["model.d_model=128", "model.n_heads=8"]
    assert script.model_width(8) == ["model.d_model=8", "model.n_heads=1"]
    with pytest.raises(SystemExit, match=r"--widths=64,128 is invalid for the main table: one d_model"):
        script.main(["--widths", "64,128", "--target", "auto", "--data", "pydocs", "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


BAD_FLAGS = [
    (["--seeds", "0"], "--seeds=0 is invalid: at least 1."),
    (["--jobs", "0"], "--jobs=0 is invalid: at least 1 run at a time."),
    (["--strategies", "checkfree,magic"], "--strategies=checkfree,magic is invalid: names of ["),
    (["--rates", "0.1,1.5"], "--rates=0.1,1.5 is invalid: hourly failure rates per stage in (0, 1]."),
    (["--rates", "0.1,x"], "--rates=0.1,x is invalid: a comma-separated list of numbers."),
    (["--target", "-1"], "--target=-1 is invalid: 'auto' or a positive validation loss."),
    (["--data", "nope"], "--data=nope is invalid: one of ["),
    (["--set", "trainer.lr"], "--set=trainer.lr is invalid: KEY=VALUE overrides."),
    (["granularity", "--sizes", "0,2"], "--sizes=0,2 is invalid: micro-batch sizes of at least 1."),
    (["--size", "0"], "--size=0 is invalid: a micro-batch size of at least 1."),
    (["granularity", "--calibration", "/nonexistent.json"], "--calibration=/nonexistent.json is invalid: the "),
    (["ablations", "--widths", "8"], "--widths=8 is invalid: d_model values of at least 16"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_flag_of_the_experiment_scripts_is_checked_before_any_work(argv, message, tmp_path, capsys):
    """One sentence on stderr naming the flag, exit 2, and nothing written: no probe, no calibration, no run."""
    script = experiment("table2")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        script.main([*argv, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err
    assert not out.exists()
    # --out onto a file is refused as well, and the file left as it was.
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--out", str(tmp_path / "file")])
    assert exit_.value.code == 2 and (tmp_path / "file").read_text() == "x"


def test_a_main_table_at_a_finer_level_runs_the_granularity_study_s_overrides():
    """``--size 2`` makes the main table at the granularity study's b = 2 level: the same overrides (so the
    study's runs are the table's), validations every T / 10 (200 CPU iterations there, 50 at the regime's 8)."""
    script = experiment("table2")
    assert script.size_overrides(2) == ["trainer.micro_batch_size=2", "trainer.eval_every=200"]
    assert script.size_overrides(8) == ["trainer.micro_batch_size=8", "trainer.eval_every=50"]
    assert script.level_overrides(2, 3.671, ["data=pydocs"]) == [*script.size_overrides(2), "trainer.target_loss=3.671",
                                                                   "data=pydocs"]


def test_a_probe_is_written_under_the_experiment_s_own_out(tmp_path):
    script = experiment("table2")
    args = script.argparse.Namespace(data="pydocs", set=["trainer.lr=0.001"], out=tmp_path / "table")
    assert script.probe_dir(args) == tmp_path / "table" / "probes" / "pydocs_trainer.lr-0.001"


def test_the_granularity_study_counts_its_calibrations_run_seconds():
    """A level's calibration.json holds its runs' summed seconds (``run_seconds``), not summaries: the study's
    run-minutes add them to its runs' own wall times (a run not started counts 0)."""
    script = experiment("table2")
    calibrations = {8: {"T": 500, "run_seconds": 600.0}, 2: {"T": 2000, "run_seconds": 1200.0}}
    runs = [{"total_wall_time_s": 30.0}, {"not_started": True}, {"total_wall_time_s": 12.5}]
    assert script.study_seconds(calibrations, runs) == 1842.5
