"""Statistics shared by the measurements: percentiles, the Wilson interval of an accuracy and
the exact McNemar test of two models on the same images."""

from __future__ import annotations

import math
from typing import Any, Sequence


def percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes in n, as fractions."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test (two-sided binomial on the discordant pairs)."""
    if len(a_correct) != len(b_correct):
        raise ValueError("paired test needs the same images")
    b = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)  # a right, b wrong
    c = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)  # b right, a wrong
    n = b + c
    if n == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(min(b, c), n, 0.5).pvalue)
    return {"only_a": b, "only_b": c, "p_value": p}
