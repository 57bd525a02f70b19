"""Reading the service's Prometheus text exposition with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` (``clip_x_total``, ``clip_y_sum``, ...) whose labels
    include ``labels``; 0 when there is none."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def series(text: str) -> set[str]:
    """Every exposed series (name and labels, without the value)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}
