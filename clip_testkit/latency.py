"""The one percentile rule of the benchmark, the fault checks and the load verdicts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TypedDict

# The latency percentiles every report shows, as fractions.
REPORTED = {"p50": 0.50, "p95": 0.95, "p99": 0.99}


def percentile(values: Iterable[float] | Mapping[float, int], fraction: float) -> float | None:
    """The smallest value with at least ``fraction`` of all values at or below it (the
    nearest-rank rule, which is also Locust's), or None for no values. ``values``: the values,
    or a histogram value -> how many times it occurs (Locust's rounded milliseconds)."""
    counts = values if isinstance(values, Mapping) else Counter(values)
    wanted = fraction * sum(counts.values())
    seen = 0
    ordered = sorted(counts)
    for value in ordered:
        seen += counts[value]
        if seen >= wanted and seen > 0:
            return value
    return ordered[-1] if ordered else None


class LatencyPercentiles(TypedDict):
    """The reported percentiles in milliseconds; None when there was no latency."""

    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def latency_percentiles_ms(latencies_s: Iterable[float], failed: int = 0) -> LatencyPercentiles:
    """``p50_ms``, ``p95_ms``, ``p99_ms`` of latencies in seconds; each of ``failed`` requests
    counts as an unbounded latency (inf), so failing requests never make the figures better."""
    counts = Counter(round(s * 1e3, 1) for s in latencies_s)
    if failed:
        counts[float("inf")] += failed
    return LatencyPercentiles(
        p50_ms=percentile(counts, REPORTED["p50"]),
        p95_ms=percentile(counts, REPORTED["p95"]),
        p99_ms=percentile(counts, REPORTED["p99"]),
    )
