"""What the benchmarks' reports compute over request results: percentiles, the distinct errors."""

from __future__ import annotations

import math
from collections.abc import Iterable

from bench.client import RequestResult

__all__ = ["percentile", "percentile_ms", "distinct_errors"]


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of a non-empty ascending list, interpolated linearly between
    the two nearest values (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The q-quantile of latencies in seconds (any order), in milliseconds; None for no values."""
    return 1000 * percentile(sorted(seconds), q) if seconds else None


def distinct_errors(results: Iterable[RequestResult], limit: int = 5) -> list[str]:
    """The first `limit` different errors of the failed results, in order: a report shows what went
    wrong without repeating one cause hundreds of times."""
    errors: list[str] = []
    for r in results:
        if not r.ok and r.error not in errors and len(errors) < limit:
            errors.append(r.error)
    return errors
