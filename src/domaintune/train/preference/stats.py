"""Intervals for pass rates and paired differences."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    if n == 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Mean of b - a over paired items with a 95% percentile bootstrap interval."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    if not diffs:
        return {"delta": None, "ci95": [None, None]}
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"delta": sum(diffs) / n, "ci95": [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]]}
