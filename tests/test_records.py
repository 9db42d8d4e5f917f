"""An iteration's record: what happens before, during and after its step lands in one ``metrics.jsonl`` line."""

from __future__ import annotations

from checkfree.plan import RecoveryReport
from checkfree.run.records import IterationRecord


def report(stage: int) -> RecoveryReport:
    return RecoveryReport(stage, "checkfree", "average", [stage - 1, stage + 1], [0.25, 0.75], bytes_moved=1000)


def test_a_record_gathers_losses_recoveries_the_step_and_a_recovery_during_validation():
    record = IterationRecord(7)
    record.struck([100.0, 130.5], lost_work_s=12.5)
    record.recovered([report(2)], 30.0, now_s=160.5, lr=[1e-3, 1e-3, 2e-3, 1e-3])
    record.struck([400.0], lost_work_s=3.0)
    record.recovered([report(1), report(2)], 45.0, now_s=500.0)
    assert record.to_dict() == {
        "iteration": 7, "failed_stages": [1, 2], "recoveries": [report(2).to_dict(), report(1).to_dict(),
                                                                report(2).to_dict()],
        "recovery_sim_s": 75.0, "lost_work_sim_s": 15.5, "failure_times_s": [100.0, 130.5, 400.0],
        "lr": [1e-3, 1e-3, 2e-3, 1e-3]}
    record.stepped(progress=5, sim_time_s=600.0, train_loss=3.5, lr=[1e-3] * 4, tokens=64)
    # A stage lost during the validation after the step: 30 s more, the time and the rates move on.
    record.recovered([report(3)], 30.0, now_s=630.0, lr=[1e-3, 1e-3, 1e-3, 2e-3])
    record.val_loss = 3.25
    line = record.to_dict()
    assert list(line) == ["iteration", "failed_stages", "recoveries", "recovery_sim_s", "lost_work_sim_s",
                          "failure_times_s", "progress", "sim_time_s", "train_loss", "lr", "tokens", "val_loss"]
    assert (line["failed_stages"], line["recovery_sim_s"], line["sim_time_s"], line["lr"], line["val_loss"]) == \
        ([1, 2, 3], 105.0, 630.0, [1e-3, 1e-3, 1e-3, 2e-3], 3.25)


def test_a_carried_record_survives_a_resume_state():
    carried = IterationRecord(12)
    carried.recovered([report(2)], 30.0, now_s=90.0, lr=[0.5, 0.5, 1.0, 0.5])
    back = IterationRecord.from_dict(carried.to_dict())
    assert back == carried and back.to_dict() == carried.to_dict()
