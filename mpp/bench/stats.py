"""Ratios of step times measured in rounds that take turns, and a distribution-free interval for
their median (scripts/bench_train.py).

Within a pair of rounds run in mirrored orders both sides sit at the same mean time, so a slow
spell or a steady drift of a shared, noisy machine hits both alike; the median over pairs then
comes with an interval from order statistics alone, whatever the distribution of the ratios.
"""
from __future__ import annotations

import math


def paired_ratios(slow: list[float], fast: list[float]) -> list[float]:
    """Per pair of rounds (r, r + 1), sum of `slow` / sum of `fast`: the rounds run in mirrored orders,
    so both sides of a pair sit at the same mean time and a drift linear in time cancels. A last odd
    round is left out; a single round gives its own ratio."""
    if len(slow) < 2:
        return [s / f for s, f in zip(slow, fast, strict=True)]
    return [(slow[r] + slow[r + 1]) / (fast[r] + fast[r + 1]) for r in range(0, len(slow) - 1, 2)]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): order statistics k + 1 and m − k of the m sorted values, with k the
    largest such that P(Binomial(m, ½) ≤ k) ≤ (1 − confidence) / 2. Whatever the distribution, the
    interval holds the true median with probability `coverage` ≥ confidence; with too few values for
    that (m ≤ 5 at 95%) it is (min, max) and `coverage` says how much less it is."""
    v, m = sorted(values), len(values)

    def below(k: int) -> float:  # P(Binomial(m, ½) ≤ k): the chance that the k + 1-th smallest is above the median
        return sum(math.comb(m, j) for j in range(k + 1)) / 2**m

    k = 0
    while k + 1 <= (m - 1) // 2 and below(k + 1) <= (1 - confidence) / 2:
        k += 1
    return v[k], v[m - 1 - k], 1 - 2 * below(k)
