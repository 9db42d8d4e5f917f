"""The paper's Table 2 (arXiv 2506.15461v2), as published: one place for its numbers.

Its 500M model on OpenWebText, trained to validation loss 2.85 on a geo-distributed testbed at 5 / 10 / 16 %
per stage per hour. The clock prices runs with ``ITERATION_S`` and ``RECOVERY_S`` (``trainer.clock=
paper_table2``, ``checkfree.simulation.clock``); the report (``checkfree.reports.table2``) sets our hours beside ``HOURS``.
Columns are keyed as the strategies name them (``RecoveryStrategy.table2_column``), rates by ``RATES`` order.
"""

from __future__ import annotations

RATES = (0.05, 0.10, 0.16)
"""The hourly failure rates of the table's three columns."""
ITERATION_S = {
    "checkpointing": (91.35, 91.35, 92.14),
    "redundant": (151.04, 151.04, 151.04),
    "checkfree": (91.32, 91.32, 92.12),  # CheckFree and CheckFree+ alike: swapping adds no time
}
"""Seconds per iteration at each of RATES, as measured by the paper on its geo-distributed testbed."""
PAPER_T = 10_000
"""Iterations the paper's no-failure 500M run needs to reach its target (validation loss 2.85)."""
RECOVERY_S = 30.0
"""A stage recovery on the paper's testbed: about 30 s (the paper, v2)."""
HOURS = {
    "checkpoint": (558.23, 621.67, 634.35), "redundant": (419.56, 419.56, 419.56),
    "checkfree": (367.81, 405.87, 562.96), "checkfree_plus": (355.13, 367.81, 460.60),
}
"""Hours to validation loss 2.85, per strategy name, at each of RATES."""
SPEEDUP_VS_CHECKPOINT = {"redundant": (1.33, 1.48, 1.51), "checkfree": (1.52, 1.53, 1.13),
                         "checkfree_plus": (1.57, 1.69, 1.38)}
SPEEDUP_VS_REDUNDANT = {"checkfree": (1.14, 1.03, 0.75), "checkfree_plus": (1.18, 1.14, 0.91)}


def iteration_seconds(column: str, hourly_rate: float) -> float:
    """The paper's iteration time of ``column`` at the Table 2 rate nearest to ``hourly_rate``."""
    nearest = min(range(len(RATES)), key=lambda i: abs(RATES[i] - hourly_rate))
    return ITERATION_S[column][nearest]
