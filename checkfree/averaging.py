"""The tensor math of CheckFree: weighted averages of neighbouring stages' weights.

Functions of tensors and floats only, checked against hand-computed values in the tests. The scalar rules
that decide the coefficients (``checkfree.recovery.rules``) live apart, so strategies stay free of tensors.
"""

from __future__ import annotations

import torch

from checkfree.recovery.rules import interpolation_weights, norm_weight

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


def neighbour_average(
    prev_state: State, next_state: State, prev_norm: float, next_norm: float, eps: float = 1e-4
) -> State:
    """CheckFree: W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b), a = |g_{i+1}| + eps, b = |g_{i-1}| + eps.

    Each neighbour is weighted by its *own* gradient norm (as in the reference code).
    """
    return weighted_state([prev_state, next_state], [prev_norm + eps, next_norm + eps])


def interpolate(
    left_state: State, right_state: State, left: int, right: int, k: int,
    left_norm: float, right_norm: float, power: float = 1.0, eps: float = 1e-4,
) -> State:
    """Fill lost stage ``k`` between ``left`` and ``right`` (docs/design.md, 'Several lost stages at once')."""
    cl, cr = interpolation_weights(left, right, k, norm_weight(left_norm, power, eps),
                                   norm_weight(right_norm, power, eps))
    return weighted_state([left_state, right_state], [cl, cr])
