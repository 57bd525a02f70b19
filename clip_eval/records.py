"""What flows through the pipeline: a pair read from a dataset row, the same pair with its images
loaded, and one model's outcome; and which result columns a run writes."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from clip_runtime.errors import ClipError
from clip_runtime.scoring import clip_score, cosines

# Columns the CLI appends to every input row, in this order (optional ones only when asked).
BASE_COLUMNS: tuple[str, ...] = ("model", "score", "cosine")
REFERENCE_COLUMNS: tuple[str, ...] = ("ref_clip_score",)
IMAGE_PAIR_COLUMNS: tuple[str, ...] = ("image_image_cosine", "image_image_score")
TEXT_PAIR_COLUMNS: tuple[str, ...] = ("text_text_cosine", "text_text_score")
ERROR_COLUMNS: tuple[str, ...] = ("error", "error_message")
RESULT_COLUMNS: tuple[str, ...] = (
    *BASE_COLUMNS,
    *REFERENCE_COLUMNS,
    *IMAGE_PAIR_COLUMNS,
    *TEXT_PAIR_COLUMNS,
    *ERROR_COLUMNS,
)


def result_columns(references: bool, image_pairs: bool, text_pairs: bool) -> tuple[str, ...]:
    """The columns a run appends: the base ones, and those of the scores it was asked for."""
    return (
        *BASE_COLUMNS,
        *(REFERENCE_COLUMNS if references else ()),
        *(IMAGE_PAIR_COLUMNS if image_pairs else ()),
        *(TEXT_PAIR_COLUMNS if text_pairs else ()),
        *ERROR_COLUMNS,
    )


@dataclass(frozen=True, slots=True)
class Pair:
    """One row's image reference (path, URL, base64, raw bytes; None when missing) and caption,
    with its reference captions and the second image and text when the run compares them."""

    image: Any
    caption: str | None
    references: tuple[str, ...] | None = None
    image_2: Any = None
    text_2: str | None = None


@dataclass(frozen=True, slots=True)
class LoadedPair:
    """A pair whose images are bytes, ready for an engine."""

    image: bytes
    caption: str
    references: tuple[str, ...] | None = None
    image_2: bytes | None = None
    text_2: str | None = None


@dataclass(frozen=True, slots=True)
class PairOutcome:
    """One pair scored by one model: scores, or an error code and message. The embeddings are
    kept only when the run writes them (``--embeddings-out``); they never go into the table."""

    model: str
    score: float | None = None
    cosine: float | None = None
    error: str | None = None
    error_message: str | None = None
    ref_clip_score: float | None = None
    image_image_cosine: float | None = None
    text_text_cosine: float | None = None
    image_vector: np.ndarray | None = None
    text_vector: np.ndarray | None = None

    @classmethod
    def scored(cls, model: str, cosine: float, **extra: Any) -> PairOutcome:
        return cls(model, clip_score(cosine), cosine, **extra)

    @classmethod
    def with_vectors(
        cls,
        model: str,
        cosine: float,
        *,
        image: np.ndarray | None = None,
        caption: np.ndarray | None = None,
        image_2: np.ndarray | None = None,
        text_2: np.ndarray | None = None,
        ref_clip_score: float | None = None,
        keep_vectors: bool = False,
    ) -> PairOutcome:
        """A scored pair, its second image and text compared through their embeddings (every
        engine the same way); the pair's embeddings kept when ``keep_vectors``."""
        return cls.scored(
            model,
            cosine,
            ref_clip_score=ref_clip_score,
            image_image_cosine=None if image_2 is None else similarity(need_vector(image), image_2),
            text_text_cosine=None if text_2 is None else similarity(need_vector(caption), text_2),
            image_vector=image if keep_vectors else None,
            text_vector=caption if keep_vectors else None,
        )

    @classmethod
    def failed(cls, model: str, error: ClipError) -> PairOutcome:
        return cls(model, error=error.code, error_message=error.message)

    def columns(self) -> dict[str, Any]:
        """This outcome's value of every result column."""
        return {
            "model": self.model,
            "score": self.score,
            "cosine": self.cosine,
            "ref_clip_score": self.ref_clip_score,
            "image_image_cosine": self.image_image_cosine,
            "image_image_score": _scaled(self.image_image_cosine),
            "text_text_cosine": self.text_text_cosine,
            "text_text_score": _scaled(self.text_text_cosine),
            "error": self.error,
            "error_message": self.error_message,
        }


def need_vector(vector: np.ndarray | None) -> np.ndarray:
    if vector is None:
        raise RuntimeError("an engine returned no embedding where one was asked for")
    return vector


def _scaled(cosine: float | None) -> float | None:
    return None if cosine is None else clip_score(cosine)


def similarity(first: np.ndarray, second: np.ndarray) -> float:
    """Cosine of two L2-normalized embeddings (as the service's rank computes cosines)."""
    return float(cosines(first, second[np.newaxis])[0])


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


def references_of(value: Any) -> tuple[str, ...] | None:
    """Reference captions: a list (JSONL, Parquet), a JSON list in text (CSV), or one text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(ValueError):  # else a caption that starts with "["
            value = json.loads(value)
    if isinstance(value, list | tuple | np.ndarray):
        return tuple(caption_of(item) or "" for item in value) or None
    caption = caption_of(value)
    return None if caption is None else (caption,)
