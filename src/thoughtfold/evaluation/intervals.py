"""Confidence intervals: of a proportion (Wilson), of the difference of two proportions (Newcombe's
hybrid score interval from two Wilson intervals), and percentile bootstrap intervals of any statistic
of a sample, paired when two methods were measured on the same items."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% for z = 1.96); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = 1.96) -> tuple[float, float]:
    """Interval of p1 - p2 for independent proportions k1/n1 and k2/n2 (Newcombe 1998, method 10):
    good coverage near 0 and 1, where the normal approximation fails."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def bootstrap_interval(statistic: Callable[[torch.Tensor], float], n: int, resamples: int = 10_000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over `n` items: each resample draws n
    item indices with replacement. Pass a statistic of two methods' values at the same indices
    (e.g. mean(a[i]) - mean(b[i])) for the paired interval of their difference."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one item")
    g = torch.Generator().manual_seed(seed)
    values = sorted(statistic(torch.randint(n, (n,), generator=g)) for _ in range(resamples))
    tail = (1 - level) / 2
    lo, hi = math.floor(tail * (resamples - 1)), math.ceil((1 - tail) * (resamples - 1))
    return values[lo], values[hi]


__all__ = ["bootstrap_interval", "newcombe_interval", "wilson_interval"]
