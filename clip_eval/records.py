"""What flows through the pipeline: a pair read from a dataset row, and one model's outcome."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from clip_runtime.errors import ClipError
from clip_runtime.scoring import clip_score

# Columns the CLI appends to every input row, in this order.
RESULT_COLUMNS: tuple[str, ...] = ("model", "score", "cosine", "error", "error_message")


@dataclass(frozen=True, slots=True)
class Pair:
    """One row's image reference (path, URL, base64, raw bytes; None when missing) and caption."""

    image: Any
    caption: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One pair scored by one model: either a score and cosine, or an error code and message."""

    model: str
    score: float | None = None
    cosine: float | None = None
    error: str | None = None
    error_message: str | None = None

    @classmethod
    def scored(cls, model: str, cosine: float, score: float | None = None) -> Outcome:
        # The service's scale (torchmetrics' CLIPScore) when the score is not given.
        return cls(model, clip_score(cosine) if score is None else score, cosine)

    @classmethod
    def failed(cls, model: str, error: ClipError) -> Outcome:
        return cls(model, error=error.code, error_message=error.message)


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA: a cell with no value, whatever the input format made of it."""
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def caption_of(value: Any) -> str | None:
    """Captions as text; a number in a JSONL/Parquet caption column is scored as its text."""
    if is_missing(value):
        return None
    return value if isinstance(value, str) else str(value)
