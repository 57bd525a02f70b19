"""The end-of-run report: counts, failures by code and score statistics per model, and a
histogram of the scores (matplotlib's Agg renderer: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


UNTRAINED_NOTE = (
    "UNTRAINED weights (random-init) for {models}: the pipeline ran, but the numbers mean "
    "nothing. Their cosines are mostly negative, and a negative cosine scores 0."
)


def untrained_note(untrained: Sequence[str]) -> str | None:
    """The plain warning for models whose weights are random-init, or None when there are none."""
    return UNTRAINED_NOTE.format(models=", ".join(untrained)) if untrained else None


def _histogram(axes: Any, scored: pd.DataFrame, column: str, label: str) -> None:
    values = pd.to_numeric(scored[column])
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:  # all equal (random-init weights often score 0): a visible bar
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 41)
    for model, rows in scored.groupby("model", sort=False):
        axes.hist(
            pd.to_numeric(rows[column]), bins=bins, alpha=0.6, label=f"{model} (n={len(rows)})"
        )
    axes.legend()
    axes.set_xlabel(label)
    axes.set_ylabel("pairs")


def histogram_figure(
    results: pd.DataFrame, title: str = "CLIP scores", untrained: Sequence[str] = ()
) -> Figure:
    """Histograms of the scores and, beside them, of the raw cosines, one overlaid series per
    model; a banner when any model's weights are untrained."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(figure)  # the Agg renderer, without pyplot's global backend state
    score_axes, cosine_axes = figure.subplots(1, 2)
    scored = results[results["score"].notna()]
    if scored.empty:
        score_axes.text(0.5, 0.5, "no pair was scored", ha="center", va="center")
    else:
        _histogram(score_axes, scored, "score", "score = 100 * max(cosine, 0)")
        _histogram(cosine_axes, scored, "cosine", "cosine of the image and text embeddings")
    score_axes.set_title("score")
    cosine_axes.set_title("cosine")
    figure.suptitle(title)
    note = untrained_note(untrained)
    if note is not None:
        figure.text(0.5, 0.01, note, ha="center", va="bottom", color="darkred", wrap=True)
    figure.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
    return figure


def plot_histogram(
    results: pd.DataFrame, path: Path, title: str = "CLIP scores", untrained: Sequence[str] = ()
) -> None:
    """``histogram_figure`` as a PNG."""
    histogram_figure(results, title, untrained).savefig(path, format="png")
