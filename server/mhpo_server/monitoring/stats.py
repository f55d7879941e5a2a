"""Robust statistics for the detectors and the alert rules: medians, MAD, robust z-scores.

Two shapes of the same statistics: vectorised over the rows of a window matrix (NaN
entries left out), which the detectors use to judge every step of a batch at once; and
over one sorted window, which a spike rule keeps up to date point by point (median in
O(1), MAD as a k-th smallest of two sorted runs in O(log w)).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation of a normal distribution


def sorted_median(ordered: Sequence[float] | np.ndarray) -> float:
    """Median of a non-empty sorted sequence."""
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid]) if n % 2 else 0.5 * float(ordered[mid - 1] + ordered[mid])


def median(values: np.ndarray) -> float:
    """Median of a small 1-d array (np.median's overhead dominates at window sizes)."""
    return sorted_median(np.sort(values))


def sorted_mad(ordered: list[float], centre: float) -> float:
    """Median of |x - centre| over sorted `ordered`: the distances left and right of `centre` are two sorted runs."""
    split = bisect.bisect_left(ordered, centre)
    n_left, n_right = split, len(ordered) - split

    def kth(k: int) -> float:  # k-th smallest (0-based) distance, by bisection over how many come from the left
        lo, hi = max(0, k + 1 - n_right), min(k + 1, n_left)
        while True:
            i = (lo + hi) // 2
            j = k + 1 - i
            left_in = centre - ordered[split - i] if i > 0 else -math.inf
            left_out = centre - ordered[split - i - 1] if i < n_left else math.inf
            right_in = ordered[split + j - 1] - centre if j > 0 else -math.inf
            right_out = ordered[split + j] - centre if j < n_right else math.inf
            if left_in > right_out:
                hi = i - 1
            elif right_in > left_out:
                lo = i + 1
            else:
                return max(left_in, right_in)

    n = len(ordered)
    return kth(n // 2) if n % 2 else 0.5 * (kth(n // 2 - 1) + kth(n // 2))


def robust_z(
    value: float, ordered: list[float], min_scale: float, rel_scale: float = 0.0
) -> tuple[float, float, float]:
    """(z, centre, scale) of `value` against the sorted window `ordered`: centre its median, scale
    `MAD_TO_SIGMA` x its MAD, at least `min_scale + rel_scale * |centre|`."""
    centre = sorted_median(ordered)
    scale = max(MAD_TO_SIGMA * sorted_mad(ordered, centre), min_scale + rel_scale * abs(centre))
    return (value - centre) / scale, centre, scale


def row_nanmedian(rows: np.ndarray) -> np.ndarray:
    """Median of the non-NaN entries of each row (NaN for an all-NaN row); np.nanmedian is slow on small rows."""
    ordered = np.sort(rows, axis=1)  # NaN sorts last
    count = np.sum(~np.isnan(rows), axis=1)
    index = np.arange(len(rows))
    lo, hi = np.maximum((count - 1) // 2, 0), np.maximum(count // 2, 0)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, 0.5 * (ordered[index, lo] + ordered[index, hi]), np.nan)


def row_sigma(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, sigma) of each row: its median and `MAD_TO_SIGMA` x its MAD (NaN entries left out)."""
    centre = row_nanmedian(rows)
    return centre, MAD_TO_SIGMA * row_nanmedian(np.abs(rows - centre[:, None]))


def row_robust_z(now: np.ndarray, rows: np.ndarray, min_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, centre, scale) of each `now[i]` against the window `rows[i]`, the scale at least `min_scale`."""
    centre, sigma = row_sigma(rows)
    scale = np.maximum(sigma, min_scale)
    return (now - centre) / scale, centre, scale
