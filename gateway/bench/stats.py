"""Percentiles of samples and of Prometheus histogram buckets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["bucket_quantile", "percentile", "summary"]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summary(samples: Iterable[float], scale: float = 1000.0) -> dict[str, Any]:
    """count, p50, p90, p99, max (seconds in, milliseconds out by default); None values when empty."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "count": len(ordered),
        "p50": round(percentile(ordered, 50) * scale, 3),
        "p90": round(percentile(ordered, 90) * scale, 3),
        "p99": round(percentile(ordered, 99) * scale, 3),
        "max": round(ordered[-1] * scale, 3),
    }


def bucket_quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """Prometheus `histogram_quantile`: cumulative counts by upper bound (with +Inf), linear in the bucket."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower  # in the overflow bucket: the highest finite bound is all we know
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return lower
