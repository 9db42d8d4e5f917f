"""checkfree.stage.routes: a micro-batch's visits, in order and swapped, and which stage an op's output is charged to."""

from __future__ import annotations

from checkfree.stage.routes import BODY, EMBED, HEAD, Visit, blame, in_order, route


def test_in_order_route_is_one_visit_per_stage():
    visits = in_order(4)
    assert visits == (Visit(0, (EMBED, BODY), 0, None, 1), Visit(1, (BODY,), 1, 0, 2),
                      Visit(2, (BODY,), 2, 1, 3), Visit(3, (BODY, HEAD), 3, 2, None))
    assert route((0, 1, 2, 3), 4) is visits  # cached: every caller shares one tuple


def test_swapped_order_visits_the_edge_stages_twice():
    # CheckFree+'s order (1, 0, 2, 4, 3) on 5 stages: embedding on 0, body 1, body 0, ..., body 3, head on 4.
    visits = route((1, 0, 2, 4, 3), 5)
    assert [(v.stage, v.ops, v.prev, v.next) for v in visits] == [
        (0, (EMBED,), None, 1), (1, (BODY,), 0, 0), (0, (BODY,), 1, 2), (2, (BODY,), 0, 4),
        (4, (BODY,), 2, 3), (3, (BODY,), 4, 4), (4, (HEAD,), 3, None)]
    assert [v.position for v in visits] == list(range(7))


def test_one_stage_runs_every_op_in_one_visit():
    assert route((0,), 1) == (Visit(0, (EMBED, BODY, HEAD), 0, None, None),)


def test_blame_charges_the_embedding_to_stage_0_and_the_head_to_the_last():
    assert [blame(EMBED, 3, 6), blame(BODY, 3, 6), blame(HEAD, 3, 6)] == [0, 3, 5]
