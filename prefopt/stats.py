"""Small exact statistics for paired held-out comparisons (pure Python + numpy).

- :func:`mcnemar_exact`: paired exact test on discordant pairs (two-sided binomial, p = 1/2).
- :func:`wilson_interval` and :func:`clopper_pearson_interval`: intervals for an accuracy.
- :func:`bootstrap_mean_diff`: seeded percentile bootstrap interval for a paired mean
  difference (resampling pairs, so the pairing is kept).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence, Tuple

import numpy as np


def _check_conf(conf: float) -> float:
    conf = float(conf)
    if not 0.0 < conf < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {conf}")
    return conf


def _check_counts(k: int, n: int) -> Tuple[int, int]:
    if int(k) != k or int(n) != n:
        raise ValueError(f"counts must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return k, n


def binom_cdf(k: int, n: int, p: float = 0.5) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly with math.comb."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.5:
        return sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value.

    ``b``: pairs only the first model gets right, ``c``: pairs only the second gets right.
    Under "no difference" each discordant pair is a fair coin, so the p-value is
    ``min(1, 2 * P(X <= min(b, c)))`` with X ~ Binomial(b + c, 1/2). No discordant pairs
    gives p = 1.
    """
    for name, v in (("b", b), ("c", c)):
        if int(v) != v or v < 0:
            raise ValueError(f"McNemar: {name} must be a non-negative integer, got {v!r}")
    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(b, c), n))


def wilson_interval(k: int, n: int, conf: float = 0.95) -> Tuple[float, float]:
    """Wilson score interval for k successes out of n (returns (nan, nan) when n = 0)."""
    k, n = _check_counts(k, n)
    conf = _check_conf(conf)
    if n == 0:
        return (float("nan"), float("nan"))
    z = NormalDist().inv_cdf(0.5 + conf / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: no rounding residue
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def clopper_pearson_interval(k: int, n: int, conf: float = 0.95) -> Tuple[float, float]:
    """Exact (Clopper-Pearson) interval, by bisection on the exact binomial tails."""
    k, n = _check_counts(k, n)
    conf = _check_conf(conf)
    if n == 0:
        return (float("nan"), float("nan"))
    a = (1.0 - conf) / 2.0

    def solve(f, target):  # f increasing in p on [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2.0
            if f(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2.0

    # lower: P(X >= k | p) = a ; upper: P(X <= k | p) = a
    lower = 0.0 if k == 0 else solve(lambda p: 1.0 - binom_cdf(k - 1, n, p), a)
    upper = 1.0 if k == n else solve(lambda p: 1.0 - binom_cdf(k, n, p), 1.0 - a)
    return (lower, upper)


def bootstrap_mean_diff(x: Sequence[float], y: Sequence[float], n_boot: int = 10000,
                        seed: int = 0, conf: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap interval for mean(x - y) over paired values.

    Pairs are resampled with replacement (``numpy.random.default_rng(seed)``), so the
    same seed gives the same interval. With a single pair the interval is that pair's
    difference.
    """
    conf = _check_conf(conf)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("paired bootstrap needs two 1-D arrays of equal length, "
                         f"got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired bootstrap needs at least one pair")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("paired bootstrap: values must be finite")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    chunk = 2000
    for start in range(0, int(n_boot), chunk):
        m = min(chunk, int(n_boot) - start)
        idx = rng.integers(0, d.size, size=(m, d.size))
        means[start:start + m] = d[idx].mean(axis=1)
    a = (1.0 - conf) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return (float(lo), float(hi))


def strength_words(p: float) -> str:
    """Plain words for a p-value of the paired exact test."""
    if p < 0.01:
        return "strong evidence"
    if p < 0.05:
        return "moderate evidence"
    if p < 0.2:
        return "weak evidence"
    return "not statistically distinguishable from chance"
