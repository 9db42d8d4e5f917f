"""The tensor math of CheckFree: a weighted average of neighbouring stages' weights.

A function of tensors and floats only, checked against hand-computed values in the tests. The scalar rules
that decide the coefficients (``checkfree.recovery.rules``) live apart and are never imported here: a
strategy decides the coefficients, an engine computes with them (``StageCompute.apply``).
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


@torch.no_grad()
def weighted_state(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * states_i / sum_i w_i, tensor by tensor (the states must share keys and shapes)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights {weights} must sum to a positive number")
    keys = states[0].keys()
    for other in states[1:]:
        if other.keys() != keys:
            raise ValueError("stages to average have different tensors (different layers_per_stage?)")
    out = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for state, w in zip(states, weights):
            acc.add_(state[key].float(), alpha=w / total)
        out[key] = acc.to(states[0][key].dtype)
    return out
