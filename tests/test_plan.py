"""checkfree.plan: plans and reports are plain data with exact records."""

from __future__ import annotations

import pytest

from checkfree.plan import (
    BODY,
    EDGES,
    HOST_SNAPSHOT,
    REPLICA,
    SHADOW,
    SNAPSHOT,
    STATE,
    STORAGE,
    ZERO_DOWN_PROJ,
    Held,
    Rebuild,
    RecoveryPlan,
    Transfer,
    Upkeep,
    fetch_transfer,
    rebuild_report,
    rebuild_transfers,
    rollback_reports,
)


def test_a_rebuild_records_its_sources_or_its_holder():
    averaged = Rebuild(2, "average", fresh_seed=7, sources=((1, 0.25), (3, 0.75)), lr=1e-3, details={"k": 1})
    assert averaged.record_sources == [1, 3] and averaged.record_coefficients == [0.25, 0.75]
    shadow = Rebuild(2, "shadow", fresh_seed=7, restore=Held(SHADOW, 2, 3))
    assert shadow.record_sources == [3] and shadow.record_coefficients == [1.0]
    fresh = Rebuild(0, "reinit", fresh_seed=1, lr=1e-3)
    assert fresh.record_sources == [] and fresh.record_coefficients == []
    plan = RecoveryPlan("checkfree", (2, 0), (averaged, shadow, fresh))
    assert plan.sources == {1, 3}
    report = rebuild_report(plan, averaged, rebuild_transfers(averaged, [2048, 2048], 0))
    assert report.to_dict() == {"stage": 2, "strategy": "checkfree", "method": "average", "sources": [1, 3],
                                "coefficients": [0.25, 0.75], "bytes_moved": 4096, "wall_s": 0.0,
                                "sim_seconds": 0.0, "lost_iterations": 0, "from_storage": False, "details": {"k": 1},
                                "transfers": [{"src": 1, "owner": 1, "holds": BODY, "n_bytes": 2048},
                                              {"src": 3, "owner": 3, "holds": BODY, "n_bytes": 2048}]}


def test_a_rebuild_s_pieces_say_who_sends_what_of_whose():
    """Each source sends its own blocks; a restored copy comes from its holder and is its owner's; a copy the new
    node held is re-made by its owner, unless it is kept in the background (off the recovery's path); a copy in
    the stage's own host memory moves nothing."""
    shadow = Rebuild(2, "shadow", fresh_seed=7, restore=Held(SHADOW, 2, 3), fetch=(Held(REPLICA, 1, 2),))
    assert rebuild_transfers(shadow, [], 900) == [Transfer(3, 2, STATE, 900)]
    assert fetch_transfer(Held(REPLICA, 1, 2), 50) == Transfer(1, 1, EDGES, 50)
    assert fetch_transfer(Held(SNAPSHOT, 1, 2), 900) is None
    own = Rebuild(2, "snapshot", fresh_seed=7, restore=Held(HOST_SNAPSHOT, 2, 2), lr=None)
    assert rebuild_transfers(own, [], 900) == []
    report = rebuild_report(RecoveryPlan("redundant", (2,), (shadow,)), shadow,
                            [Transfer(3, 2, STATE, 900), Transfer(1, 1, EDGES, 50)])
    assert report.bytes_moved == 950


def test_a_rebuild_refuses_unknown_transforms_and_a_kept_optimizer_without_a_shadow():
    assert Rebuild(1, "zero", 0, transforms=(ZERO_DOWN_PROJ,), lr=0.1).transforms == ("zero_down_proj",)
    with pytest.raises(ValueError, match=r"unknown transform\(s\) \['scale'\]"):
        Rebuild(1, "x", 0, transforms=("scale",), lr=0.1)
    with pytest.raises(ValueError, match="stage 1: lr=None keeps a restored optimizer, which needs a held copy of the whole state"):
        Rebuild(1, "copy+replica", 0, restore=Held(REPLICA, 1, 2))


def test_rollback_reports_one_record_per_lost_stage():
    restored = {"progress": 6, "path": "/runs/a/checkpoints/ckpt_6", "shard_bytes": [10, 30, 20], "damaged": ["ckpt_9"]}
    reports = rollback_reports(RecoveryPlan("checkpoint", (1, 2), rollback=STORAGE), 10, restored)
    details = {"rolled_back_to": 6, "checkpoint": "ckpt_6", "all_stages": True, "largest_shard_bytes": 30,
               "shard_bytes": [10, 30, 20], "damaged": ["ckpt_9"]}
    assert [(r.stage, r.method, r.bytes_moved, r.lost_iterations, r.from_storage, r.details) for r in reports] == [
        (1, "rollback", 30, 4, True, details), (2, "rollback", 20, 4, True, details)]


def test_upkeep_is_true_only_when_there_is_work():
    assert not Upkeep() and Upkeep(checkpoint=True) and Upkeep(refresh=(Held(REPLICA, 0, 1),))
