"""The scalar rules of neighbour recovery: who the surviving neighbours are and how much each one weighs.

Pure functions of ints and floats (strategies import no tensor code); the tensors are combined with these
coefficients by ``checkfree.stage.averaging.weighted_state`` inside the engines.
"""

from __future__ import annotations


def norm_weight(norm: float, power: float = 1.0, eps: float = 1e-4) -> float:
    """A neighbour's weight: |g|^power + eps."""
    return float(norm) ** power + eps


def interpolation_weights(left: int, right: int, k: int, left_weight: float, right_weight: float) -> tuple[float, float]:
    """Coefficients of W_L and W_R for a lost stage L < k < R, normalised to sum to 1
    (docs/design.md, 'Several lost stages at once').

    W_k = ((R-k) b W_L + (k-L) a W_R) / ((R-k) b + (k-L) a), b and a the left and right weights; for
    R - L = 2 this is the neighbour average.
    """
    if not left < k < right:
        raise ValueError(f"stage {k} is not strictly between survivors {left} and {right}")
    wl, wr = (right - k) * left_weight, (k - left) * right_weight
    return wl / (wl + wr), wr / (wl + wr)


def nearest_survivors(k: int, failed: set[int] | frozenset[int], n_stages: int) -> tuple[int | None, int | None]:
    """The closest surviving stage on each side of ``k`` (None where there is none)."""
    left = next((j for j in range(k - 1, -1, -1) if j not in failed), None)
    right = next((j for j in range(k + 1, n_stages) if j not in failed), None)
    return left, right
