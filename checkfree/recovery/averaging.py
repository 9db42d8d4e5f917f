"""The pure math of CheckFree: weighted averages of neighbouring stages' tensors.

Everything here is a function of tensors and floats, so it can be checked against hand-computed values.
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


def norm_weight(norm: float, power: float = 1.0, eps: float = 1e-4) -> float:
    """A neighbour's weight: |g|^power + eps."""
    return float(norm) ** power + eps


def neighbour_average(
    prev_state: State, next_state: State, prev_norm: float, next_norm: float, eps: float = 1e-4
) -> State:
    """CheckFree: W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b), a = |g_{i+1}| + eps, b = |g_{i-1}| + eps.

    Each neighbour is weighted by its *own* gradient norm (as in the reference code).
    """
    return weighted_state([prev_state, next_state], [prev_norm + eps, next_norm + eps])


def interpolation_weights(left: int, right: int, k: int, left_weight: float, right_weight: float) -> tuple[float, float]:
    """Coefficients of W_L and W_R for a lost stage L < k < R (DESIGN §5), normalised to sum to 1.

    W_k = ((R-k) b W_L + (k-L) a W_R) / ((R-k) b + (k-L) a), with b, a the left and right weights.
    For R - L = 2 this is the neighbour average.
    """
    if not left < k < right:
        raise ValueError(f"stage {k} is not strictly between survivors {left} and {right}")
    wl, wr = (right - k) * left_weight, (k - left) * right_weight
    return wl / (wl + wr), wr / (wl + wr)


def interpolate(
    left_state: State, right_state: State, left: int, right: int, k: int,
    left_norm: float, right_norm: float, power: float = 1.0, eps: float = 1e-4,
) -> State:
    """Fill lost stage ``k`` between surviving stages ``left`` and ``right``."""
    cl, cr = interpolation_weights(left, right, k, norm_weight(left_norm, power, eps),
                                   norm_weight(right_norm, power, eps))
    return weighted_state([left_state, right_state], [cl, cr])


def nearest_survivors(k: int, failed: set[int], n_stages: int) -> tuple[int | None, int | None]:
    """The closest surviving stage on each side of ``k`` (None where there is none)."""
    left = next((j for j in range(k - 1, -1, -1) if j not in failed), None)
    right = next((j for j in range(k + 1, n_stages) if j not in failed), None)
    return left, right
