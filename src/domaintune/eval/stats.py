"""Paired bootstrap confidence intervals and inter-rater agreement."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np


def paired_bootstrap_delta(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    samples: int = 1000,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] | None = None,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Delta stat(b) - stat(a) on paired items, with a percentile bootstrap (1 - alpha) interval.

    `a` and `b` hold one row per item (scalars, or rows such as (nll_sum, n_tokens) when `stat`
    aggregates them); the same resampled item indices are used for both, so the interval
    reflects the paired design. Seeded: the same inputs give the same interval.
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired bootstrap needs aligned items, got {a_arr.shape} vs {b_arr.shape}")
    n = a_arr.shape[0]
    stat = stat or (lambda x: float(np.mean(x)))
    delta = stat(b_arr) - stat(a_arr)
    if n < 2:
        return {"delta": float(delta), "ci_low": float("nan"), "ci_high": float("nan"), "n": int(n)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    deltas = np.fromiter((stat(b_arr[i]) - stat(a_arr[i]) for i in idx), dtype=float, count=samples)
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return {"delta": float(delta), "ci_low": float(low), "ci_high": float(high), "n": int(n)}


def cohen_kappa(labels_1: Sequence[str], labels_2: Sequence[str]) -> float | None:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e); None when undefined (both raters used one same label)."""
    if len(labels_1) != len(labels_2):
        raise ValueError("kappa needs the same items rated by both reviewers")
    n = len(labels_1)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(labels_1, labels_2)) / n
    c1, c2 = Counter(labels_1), Counter(labels_2)
    p_e = sum(c1[k] * c2[k] for k in set(c1) | set(c2)) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1 - p_e)


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(centre - half), float(centre + half)
