"""Sampling error of an accuracy and a paired comparison of two methods on the same questions (numpy only).

* `wilson(k, n)`: the 95% Wilson score interval of k correct out of n (Wilson 1927; it stays inside [0, 1]
  and keeps its coverage near 0 and 1, where the normal interval does not);
* `mcnemar_exact(a, b)`: the exact (binomial) McNemar test of two methods answering the same questions:
  only the discordant questions count, and under "the two are equally accurate" each of them goes either way
  with probability 1/2.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) Wilson score interval of the proportion k / n; (0, 1) for n = 0.

    centre = (p + z²/2n) / (1 + z²/n), half width = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    """
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # the interval always holds k / n; the ends are exact at k = 0 and k = n (no float round-off past p)
    low = 0.0 if k == 0 else min(p, max(0.0, centre - half))
    high = 1.0 if k == n else max(p, min(1.0, centre + half))
    return low, high


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed exactly in log space (float64)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    i = np.arange(k + 1)
    log_terms = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
                 - n * math.log(2.0))
    return float(min(1.0, np.exp(log_terms).sum()))


def mcnemar_exact(correct_a, correct_b) -> dict[str, float | int]:
    """Exact two-sided McNemar test of two methods over the same questions.

    correct_a, correct_b: [N] bool, whether each method answered each question right.
    Returns {"a_only": questions only A got right, "b_only": only B, "p": two-sided p-value
    min(1, 2 P(X <= min(a_only, b_only))), X ~ Binomial(a_only + b_only, 1/2); 1 when no question differs}.
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same questions, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    p = 1.0 if n == 0 else min(1.0, 2.0 * binom_cdf_half(min(a_only, b_only), n))
    return {"a_only": a_only, "b_only": b_only, "p": p}
