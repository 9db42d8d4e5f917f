"""checkfree.lifecycle: what a run leaves behind, in numbers (signals: tests/test_reliability.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from checkfree.lifecycle import DIVERGED_FACTOR, Run
from checkfree.run.runlog import read_metrics


def test_divergence_is_a_warning_with_the_losses_and_the_lr(tmp_path, capsys):
    totals = SimpleNamespace(initial_val_loss=5.0, final_val_loss=5.0 * DIVERGED_FACTOR)
    trainer = SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(lr=0.003)), run_dir=tmp_path, totals=totals)
    run = Run(trainer)
    run.check_divergence()
    assert run.warnings == []  # at the factor exactly: not diverged
    totals.final_val_loss = float("nan")
    run.check_divergence()
    assert run.warnings == ["the run diverged: its validation loss ended at nan, above the 5 it started from; "
                            "lower trainer.lr (now 0.003)."]
    assert capsys.readouterr().err == f"warning: {run.warnings[0]}\n"


def test_a_run_saves_at_boundaries_and_counts_what_happened(small_run, tmp_path):
    from checkfree.train import build_run

    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([{"iteration": 2, "stage": 1}, {"iteration": 3, "stage": 2}]))
    cfg = small_run(failure={"name": "trace", "path": str(trace)},
                    trainer={"iterations": 5, "eval_every": 2, "save_every": 2})
    run = build_run(cfg, tmp_path / "run")
    summary = run.run()
    assert (summary["status"], summary["n_failures"], summary["n_recoveries"]) == ("completed", 2, 2)
    assert summary["recoveries_by_method"] == {"average": 2}
    assert [(f["iteration"], f["stage"]) for f in summary["failures"]] == [(2, 1), (3, 2)]
    # Saved every 2 iterations and at the end: the last save is after iteration 5, the run's last.
    assert (run.consistent_at, run.saved_at, summary["resumable_from_iteration"]) == (5, 5, 5)
    assert summary["resumed_at_iterations"] == [] and summary["iterations"] == 5
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["iteration"] for r in records if "val_loss" in r] == [0, 2, 4, 5]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_a_resume_in_another_environment_is_a_warning_that_names_both(small_run, tmp_path):
    import torch

    from checkfree.run.provenance import label
    from checkfree.run.resume import state_path
    from checkfree.train import build_run

    first = build_run(small_run(trainer={"iterations": 3, "eval_every": 3, "save_every": 1}), tmp_path / "run")
    here = first.run()["environment"]
    state = torch.load(state_path(tmp_path / "run"), weights_only=False)
    assert state["environment"] == here  # the state carries the environment it was saved in
    older = {**here, "transformers": "4.48.0"}
    torch.save({**state, "environment": older}, state_path(tmp_path / "run"))
    resumed = build_run(small_run(trainer={"iterations": 5, "eval_every": 3, "save_every": 1,
                                           "resume": str(tmp_path / "run")}), tmp_path / "elsewhere")
    summary = resumed.run()
    assert summary["status"] == "completed" and summary["environment"] == here
    assert summary["warnings"] == [f"resumed in another environment: the iterations up to 3 ran with {label(older)}, "
                                   f"the rest with {label(here)}; the run's numbers need not match either "
                                   "environment's to the digit."]
    torch.save(state, state_path(tmp_path / "run"))  # the same environment again: no warning
    again = build_run(small_run(trainer={"iterations": 6, "eval_every": 3, "save_every": 1,
                                         "resume": str(tmp_path / "run")}), tmp_path / "elsewhere")
    assert again.run()["warnings"] == []
