"""``experiments/clock_check.py``'s arithmetic on hand-made records (no training), its grid, and its refusals."""

from __future__ import annotations

import pytest

from tests.scripts import assert_refused, experiment

check = experiment("clock_check")


def record(iteration: int, sim: float, wall: float, **extra) -> dict:
    return {"iteration": iteration, "sim_time_s": sim, "wall_time_s": wall, **extra}


def test_iterations_are_compared_one_by_one_leaving_out_warm_up_validations_and_losses():
    records = [record(0, 0.0, 0.0, val_loss=7.0), record(1, 1.0, 20.0), record(2, 2.0, 21.5),
               record(3, 3.0, 22.5), record(4, 5.0, 24.0, overhead_sim_s=1.0), record(5, 6.0, 25.25),
               record(6, 7.0, 26.0, val_loss=5.0), record(7, 8.0, 29.0), record(8, 9.0, 31.0, failed_stages=[2]),
               record(9, 10.0, 32.0)]
    compared = check.pairs(records)
    # Iterations 3 (1 s predicted, 1 s measured), 4 (upkeep: 2 and 1.5), 5 (1 and 1.25), 6 (1 and 0.75: its record
    # is written before its validation runs) and 9 (1 and 1); 7 holds the validation's seconds, 8 lost a stage.
    assert compared == [{"measured_s": 1.0, "predicted_s": 1.0, "upkeep": False},
                        {"measured_s": 1.5, "predicted_s": 2.0, "upkeep": True},
                        {"measured_s": 1.25, "predicted_s": 1.0, "upkeep": False},
                        {"measured_s": 0.75, "predicted_s": 1.0, "upkeep": False},
                        {"measured_s": 1.0, "predicted_s": 1.0, "upkeep": False}]
    plain = check.errors([c for c in compared if not c["upkeep"]])
    assert plain["n"] == 4
    assert plain["measured_s"] == pytest.approx(1.0) and plain["predicted_s"] == pytest.approx(1.0)
    assert plain["error"] == pytest.approx(0.0)
    assert plain["mape"] == pytest.approx((0 + 0.25 / 1.25 + 0.25 / 0.75 + 0) / 4)
    assert check.errors([c for c in compared if c["upkeep"]])["error"] == pytest.approx(0.5 / 1.5)
    assert check.errors([])["n"] == 0


def test_every_point_has_its_own_run_directory_number():
    grid = [p for network in check.NETWORKS for struck in (False, True)
            for p in check.points(list(check.STRATEGIES), 2, 4.0, network, struck)]
    assert len(grid) == 2 * 2 * 2 * 6 and len({index for _, index, _ in grid}) == len(grid)
    geo = [o for _, _, o in grid if "network=geo_distributed" in o]
    assert all("network.link_scale=4" in o for o in geo)
    assert not any("network.link_scale" in o for _, _, o in grid if "network=single_cluster" in o)
    # A subset keeps the numbers it has in the whole grid: a later, larger invocation resumes the same runs.
    whole = check.points(list(check.STRATEGIES), 2, 4.0, "single_cluster", struck=True)
    assert check.points(["snapshot_restore"], 1, 4.0, "single_cluster", struck=True)[0][1] == \
        [i for _, i, o in whole if "strategy=snapshot_restore" in o][0]


def test_a_recovery_and_the_iteration_it_struck_are_compared_with_their_prices():
    # Iteration 4 lost a stage mid-step: the clock priced the recovery at 3 s and the lost attempt at 1 s more.
    records = [record(3, 3.0, 10.0), record(4, 9.0, 14.0, failed_stages=[2], recovery_sim_s=4.0, recovery_price_s=3.0,
                                            recovery_wall_s=2.5),
               record(5, 10.0, 15.0, val_loss=4.0), record(6, 11.0, 17.0, failed_stages=[3], recovery_wall_s=1.0)]
    recoveries, struck = check.losses(records)
    assert recoveries == [{"measured_s": 2.5, "predicted_s": 3.0}]  # one right after a validation is left out
    assert struck == [{"measured_s": 4.0, "predicted_s": 6.0}]
    assert check.errors(struck)["error"] == pytest.approx(0.5)


@pytest.mark.parametrize("flag, message", [
    (["--seeds", "0"], "--seeds=0 is invalid: allowed is an integer >= 1"),
    (["--geo-scale", "0"], "--geo-scale=0.0 is invalid: allowed is a number from 1e-6 to 1e6"),
    (["--strategies", "checkfree,bamboo"], "a comma-separated list of checkfree, checkfree_plus, checkpoint"),
    (["--compute-time", "gpu"], "--compute-time=gpu is invalid: allowed is wall or cpu"),
])
def test_bad_flags_are_one_sentence_before_any_work(tmp_path, flag, message):
    assert_refused("clock_check", tmp_path / "out", flag, message)


def test_only_pairs_the_seeds_can_tell_apart_are_ranked():
    import pandas as pd

    # a: 1.0 and 1.2 s (spread 0.2), b: 1.1 and 1.1 (0), c: 2.0 and 2.1 (0.1). a-b differ by 0.0 < 0.2: not
    # resolved; a-c by 0.95 and b-c by 0.95: resolved. The clock prices c below b (wrong) and above a (right).
    runs = pd.DataFrame({"strategy": ["a", "a", "b", "b", "c", "c"],
                         "measured": [1.0, 1.2, 1.1, 1.1, 2.0, 2.1],
                         "predicted": [1.0, 1.0, 3.0, 3.0, 2.0, 2.0]})
    resolved, alike = check.resolved_pairs(runs)
    assert resolved == [("a", "c"), ("b", "c")] and alike == 1
    # One seed each: no spread to judge the noise by, so nothing is resolved; a tie in price is never alike.
    assert check.resolved_pairs(runs.iloc[::2]) == ([], 0)
    assert check.resolved_pairs(runs.assign(predicted=2.0))[1] == 0


def test_strategies_run_on_another_machine_are_not_ranked_with_the_rest():
    import pandas as pd

    # c's runs were made on a faster machine: measured seconds there do not compare with a's and b's; a run made
    # before summaries named their machine ("not recorded") counts as a machine of its own.
    runs = pd.DataFrame({"strategy": ["a", "a", "b", "b", "c", "c"],
                         "machine": ["X, 2 cores"] * 4 + ["Y, 2 cores"] * 2,
                         "measured": [1.0, 1.0, 2.0, 2.0, 0.5, 0.5], "predicted": [1.0] * 6})
    kept, note = check.one_machine(runs)
    assert sorted(set(kept.strategy)) == ["a", "b"]
    assert note == (" Not ranked: c, whose runs were made on another machine than the rest's (on X, 2 cores): "
                    "times compare on one machine only.")
    same, none = check.one_machine(runs.assign(machine="X, 2 cores"))
    assert none == "" and len(same) == 6
    mixed = runs.assign(machine=["X, 2 cores", "not recorded", "X, 2 cores", "X, 2 cores", "X, 2 cores", "X, 2 cores"])
    assert sorted(set(check.one_machine(mixed)[0].strategy)) == ["b", "c"]
    old = runs.assign(machine=["not recorded"] * 4 + ["Y, 2 cores"] * 2)
    assert check.one_machine(old)[1] == (" Not ranked: c, whose runs were made on another machine than the rest's "
                                         "(made before summaries named their machine): times compare on one machine "
                                         "only.")


def test_an_out_holds_runs_of_one_compute_time_only(tmp_path, capsys):
    """``--compute-time`` refuses an ``--out`` whose completed runs kept the other time, and cpu the default
    ``--out`` (the wall-clock runs'); a run that never completed does not bind it."""
    import json

    run = tmp_path / "runs" / "clock_check" / "000_checkfree"
    run.mkdir(parents=True)
    summary = {"status": "completed", "config": {"engine": {"compute_time": "wall"}}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert check.times_of("wall", tmp_path) == []
    with pytest.raises(SystemExit) as refused:
        check.times_of("cpu", tmp_path)
    assert refused.value.code == 2 and "holds runs timed by wall" in capsys.readouterr().err
    (run / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    assert check.times_of("cpu", tmp_path) == ["engine.compute_time=cpu", "trainer.device=cpu"]
    with pytest.raises(SystemExit):
        check.times_of("cpu", check.ROOT / "results" / "clock_check")
