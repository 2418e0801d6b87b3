"""The benches' statistics: medians, nearest-rank percentiles, ratios, rounding (stdlib only)."""

from __future__ import annotations

import statistics


def percentile(values, q: int) -> float | None:
    """Nearest-rank percentile: the sample below which q% of the samples lie (no interpolation); None
    for no samples."""
    ordered = sorted(values)
    return ordered[_rank(len(ordered), q)] if ordered else None


def p95(values) -> float:
    """Nearest-rank 95th percentile of at least one sample."""
    ordered = sorted(values)
    return ordered[_rank(len(ordered), 95)]


def _rank(count: int, q: int) -> int:
    return max(0, -(-q * count // 100) - 1)  # ceil(q% of count) - 1, in integers: no 0.95 * n rounding


def median(values) -> float | None:
    """The median of the values that are not None, to 2 decimals; None when there are none."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def summarize(samples_ms: list[float]) -> dict:
    """Median, min, max and count of timings in ms."""
    return {
        "ms": round(statistics.median(samples_ms), 3),
        "min_ms": round(min(samples_ms), 3),
        "max_ms": round(max(samples_ms), 3),
        "n": len(samples_ms),
    }


def ratio(a, b, digits: int = 3) -> float | None:
    """a / b, rounded; None when either is missing or b is not positive."""
    return None if a is None or b is None or b <= 0 else round(a / b, digits)


def rounded(value, digits: int = 3):
    return None if value is None else round(value, digits)


def rounded_all(values: list) -> list:
    return [rounded(v, 2) for v in values]
