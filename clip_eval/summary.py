"""The end-of-run report: counts, failures by code and score statistics per model, and a
histogram of the scores (matplotlib's Agg renderer: no display needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PERCENTILES: tuple[int, ...] = (5, 25, 75, 95)


@dataclass(frozen=True)
class ModelSummary:
    model: str
    pairs: int
    scored: int
    failures: dict[str, int] = field(default_factory=dict)  # error code -> count
    mean: float | None = None
    median: float | None = None
    std: float | None = None  # sample standard deviation (n - 1)
    minimum: float | None = None
    maximum: float | None = None
    percentiles: dict[int, float] = field(default_factory=dict)


def summarize(results: pd.DataFrame) -> list[ModelSummary]:
    """One summary per model, in order of first appearance, from ``model``/``score``/``error``."""
    summaries = []
    for model, rows in results.groupby("model", sort=False):
        # CSV reads an empty error cell as NaN, other formats give null; both mean "scored".
        failed = rows["error"].notna() & (rows["error"].astype(str) != "")
        errors = rows.loc[failed, "error"].astype(str)
        scores = pd.to_numeric(rows.loc[~failed, "score"]).dropna().to_numpy(dtype=np.float64)
        failures = {str(code): int(n) for code, n in errors.value_counts().sort_index().items()}
        if len(scores) == 0:
            summaries.append(ModelSummary(str(model), len(rows), 0, failures))
            continue
        summaries.append(
            ModelSummary(
                model=str(model),
                pairs=len(rows),
                scored=len(scores),
                failures=failures,
                mean=float(scores.mean()),
                median=float(np.median(scores)),
                std=float(scores.std(ddof=1)) if len(scores) > 1 else None,
                minimum=float(scores.min()),
                maximum=float(scores.max()),
                percentiles={p: float(np.percentile(scores, p)) for p in PERCENTILES},
            )
        )
    return summaries


def format_summary(summaries: list[ModelSummary]) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = []
    for summary in summaries:
        failed = summary.pairs - summary.scored
        lines.append(
            f"{summary.model}: {summary.pairs} pairs, {summary.scored} scored, {failed} failed"
        )
        for code, count in summary.failures.items():
            lines.append(f"  failed {code}: {count}")
        if summary.scored:
            spread = "  ".join(f"p{p} {number(v)}" for p, v in summary.percentiles.items())
            lines.append(
                f"  score mean {number(summary.mean)}  median {number(summary.median)}  "
                f"std {number(summary.std)}  min {number(summary.minimum)}  "
                f"max {number(summary.maximum)}"
            )
            lines.append(f"  {spread}")
    return "\n".join(lines)


def plot_histogram(results: pd.DataFrame, path: Path, title: str = "CLIP scores") -> None:
    """A PNG histogram of the scores, one overlaid series per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)  # the Agg renderer, without pyplot's global backend state
    axes = figure.subplots()
    scored = results[results["score"].notna()]
    if scored.empty:
        axes.text(0.5, 0.5, "no pair was scored", ha="center", va="center")
    else:
        values = pd.to_numeric(scored["score"])
        low, high = float(values.min()), float(values.max())
        if high - low < 1e-6:  # all equal (random-init weights often give 0): a visible bar
            low, high = low - 0.5, high + 0.5
        bins = np.linspace(low, high, 41)
        for model, rows in scored.groupby("model", sort=False):
            axes.hist(
                pd.to_numeric(rows["score"]), bins=bins, alpha=0.6, label=f"{model} (n={len(rows)})"
            )
        axes.legend()
    axes.set_title(title)
    axes.set_xlabel("score = 100 * max(cosine, 0)")
    axes.set_ylabel("pairs")
    figure.tight_layout()
    figure.savefig(path, format="png")
