"""The answers' assembly: wire results built from the model worker's outcomes and the model's
store entry. Pure (no BentoML, no I/O, no metrics), so every value a client reads is unit-tested
without a server (tests/test_answers.py); the handlers in ``clip_service.front_end`` call it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import numpy as np

from clip_runtime import errors as E
from clip_runtime.jobs import Job, JobOutcome
from clip_runtime.model_entry import ModelEntry
from clip_runtime.scoring import (
    clip_score,
    cosines,
    paper_clip_s,
    rank_probabilities,
    ref_clip_score,
)
from clip_service.schemas import (
    BatchItemResult,
    BatchResult,
    EmbeddingsResult,
    ItemError,
    ModelStatus,
    RankCandidate,
    RankResult,
    Scale,
    SingleResult,
)


class ModelFields(TypedDict):
    """Which model answered, as every result names it."""

    model: str
    pretrained: str | None
    weights: str


def model_fields(name: str, entry: ModelEntry) -> ModelFields:
    """The model/pretrained/weights block: ``weights`` says random-init where scores mean
    nothing, and ``pretrained`` is null for anything but an open_clip tag."""
    return ModelFields(model=name, pretrained=entry.pretrained, weights=entry.weights)


def vector(value: np.ndarray | None) -> np.ndarray:
    """An embedding the job asked for; its absence is a model worker bug, not a client's."""
    if value is None:
        raise RuntimeError("the model worker returned no embedding for a job that asked for one")
    return value


def embedding(job: Job, outcome: JobOutcome) -> np.ndarray:
    """A single-tower job's embedding: the image's when it sent an image, else the text's."""
    return vector(outcome.image_vector if job.image is not None else outcome.text_vector)


def pair_ref_clip_score(outcome: JobOutcome, references: Sequence[JobOutcome]) -> float | None:
    """RefCLIPScore of a scored pair against its references' outcomes; None without references
    or when the pair itself failed."""
    if not references or outcome.error is not None:
        return None
    caption = vector(outcome.text_vector)
    similarities = [float(vector(reference.text_vector) @ caption) for reference in references]
    return ref_clip_score(outcome.cosine or 0.0, similarities)


def _with_optional_scores(
    result: SingleResult | BatchItemResult, cosine: float, ref_score: float | None, scale: Scale
) -> None:
    if scale == "paper":
        result.clip_s = paper_clip_s(cosine)
    if ref_score is not None:
        result.ref_clip_score = ref_score


def single_result(
    name: str, entry: ModelEntry, outcome: JobOutcome, ref_score: float | None, scale: Scale
) -> SingleResult:
    """The answer for one scored pair (its outcome has no error)."""
    cosine = outcome.cosine or 0.0
    result = SingleResult(
        **model_fields(name, entry),
        score=clip_score(cosine),
        cosine=cosine,
        text_truncated=outcome.text_truncated,
    )
    _with_optional_scores(result, cosine, ref_score, scale)
    return result


def scored_item(
    index: int, outcome: JobOutcome, ref_score: float | None, scale: Scale
) -> BatchItemResult:
    """One /batch item that was scored (its outcome has no error)."""
    cosine = outcome.cosine or 0.0
    result = BatchItemResult(
        index=index,
        score=clip_score(cosine),
        cosine=cosine,
        text_truncated=outcome.text_truncated,
        error=None,
    )
    _with_optional_scores(result, cosine, ref_score, scale)
    return result


def failed_item(index: int, error: E.ClipError) -> BatchItemResult:
    """One /batch item that failed alone: its error's code and message, no score."""
    return BatchItemResult(
        index=index,
        score=None,
        cosine=None,
        text_truncated=False,
        error=ItemError(code=error.code, message=error.message),
    )


def batch_result(name: str, entry: ModelEntry, results: list[BatchItemResult]) -> BatchResult:
    """The /batch answer: the items in request order and how many succeeded and failed."""
    failed = sum(result.error is not None for result in results)
    return BatchResult(
        **model_fields(name, entry),
        results=results,
        succeeded=len(results) - failed,
        failed=failed,
    )


def rank_result(
    name: str,
    entry: ModelEntry,
    status: ModelStatus,
    ranked: Literal["texts", "images"],
    anchor: np.ndarray,
    candidates: Sequence[np.ndarray],
) -> RankResult:
    """Candidates ranked against the anchor's embedding, with probabilities the way the model's
    family was trained (``status`` carries its family, logit_scale and logit_bias)."""
    values = cosines(anchor, np.stack(candidates))
    probabilities = rank_probabilities(values, status.family, status.logit_scale, status.logit_bias)
    return RankResult(
        **model_fields(name, entry),
        ranked=ranked,
        logit_scale=status.logit_scale,
        results=[
            RankCandidate(
                index=index,
                cosine=float(cosine),
                score=clip_score(float(cosine)),
                probability=float(probability),
            )
            for index, (cosine, probability) in enumerate(zip(values, probabilities, strict=True))
        ],
        best=int(np.argmax(values)),
    )


def embeddings_result(
    name: str,
    entry: ModelEntry,
    vectors: Sequence[np.ndarray],
    truncated: list[bool] | None = None,
) -> EmbeddingsResult:
    """Embeddings in request order; ``truncated`` (texts only) says which texts were cut."""
    result = EmbeddingsResult(
        **model_fields(name, entry),
        dim=len(vectors[0]),
        embeddings=[row.tolist() for row in vectors],
    )
    if truncated is not None:
        result.text_truncated = truncated
    return result
