"""``none`` — nothing fails (the no-failure baseline)."""

from __future__ import annotations

from checkfree.failure_models.base import ONE_NODE, FailureConfig, FailureEvent, FailureModel, Nodes


class NoFailures(FailureModel):
    @classmethod
    def build(cls, cfg: FailureConfig, n_stages: int, stages: list[int], seed: int, nodes: Nodes = ONE_NODE) -> NoFailures:
        return cls()

    def events(self, iteration: int, t_start: float, t_end: float) -> list[FailureEvent]:
        return []


MODEL = NoFailures
