"""Wire types: what the HTTP API accepts and answers (the OpenAPI document is generated from
them). Optional scores appear only when asked for, so plain answers keep the plain contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scale = Literal["torchmetrics", "paper"]


def model_parameter(served: Sequence[str], default: str) -> Any:
    """The type of the endpoints' optional ``model`` field, documented with the served names (the
    API docs are generated at import, once the served models are known)."""
    names = ", ".join(f"`{name}`" for name in served)
    return Annotated[
        str | None,
        Field(
            description=f"One of the served models: {names} (default `{default}`). "
            "/evaluator/health gives each one's family (clip or siglip) and tag.",
            examples=list(served),
        ),
    ]


def _absent(value: object) -> bool:
    return value is None


class ItemError(BaseModel):
    code: str
    message: str


class SingleResult(BaseModel):
    score: float = Field(description="100 * max(cosine, 0), torchmetrics' CLIPScore scale")
    cosine: float = Field(description="cosine of the L2-normalised image and text embeddings")
    model: str
    pretrained: str | None = Field(description="open_clip tag; null for non-pretrained weights")
    weights: str = Field(description="pretrained | checkpoint | random-init (untrained!)")
    text_truncated: bool = Field(description="the caption had more tokens than the context")
    clip_s: float | None = Field(
        default=None,
        exclude_if=_absent,
        description='with scale="paper": Hessel et al.\'s 2.5 * max(cos, 0)',
    )
    ref_clip_score: float | None = Field(
        default=None,
        exclude_if=_absent,
        description="with references: RefCLIPScore (Hessel et al. 2021)",
    )


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not dropped

    image: str | None = Field(default=None, description="base64, data: URI or http(s) URL")
    text: str | None = None
    references: list[str] | None = Field(default=None, description="reference captions")


class BatchItemResult(BaseModel):
    index: int
    score: float | None
    cosine: float | None
    text_truncated: bool
    error: ItemError | None
    clip_s: float | None = Field(default=None, exclude_if=_absent)
    ref_clip_score: float | None = Field(default=None, exclude_if=_absent)


class BatchResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    results: list[BatchItemResult]
    succeeded: int
    failed: int


class RankCandidate(BaseModel):
    index: int
    cosine: float
    score: float
    probability: float = Field(
        description="CLIP: softmax(logit_scale * cosine) over the candidates; SigLIP: "
        "sigmoid(logit_scale * cosine + logit_bias) per candidate"
    )


class RankResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    ranked: Literal["texts", "images"]
    logit_scale: float
    results: list[RankCandidate] = Field(description="in request order")
    best: int = Field(description="index of the most similar candidate")


class EmbeddingsResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    dim: int
    embeddings: list[list[float]] = Field(description="L2-normalised float32, request order")
    text_truncated: list[bool] | None = Field(
        default=None, exclude_if=_absent, description="text embeddings: per text"
    )


class ModelStatus(BaseModel):
    """A served model as the model worker reports it (internal API)."""

    name: str
    architecture: str
    pretrained: str | None
    weights: str
    untrained: bool
    device: str
    dtype: str
    runtime: str  # what runs the towers (clip_runtime.runtimes): torch or openvino
    ready: bool
    embed_dim: int
    logit_scale: float
    family: Literal["clip", "siglip"] = "clip"
    logit_bias: float | None = None
    # The model worker decodes this model's JPEGs on its device (the front end forwards them).
    device_decode: bool = False


class ModelHealth(BaseModel):
    name: str
    architecture: str
    pretrained: str | None
    weights: str
    untrained: bool
    device: str | None
    dtype: str | None
    runtime: str | None = Field(
        default=None, description="what runs the towers: torch or openvino (CLIP_RUNTIME)"
    )
    ready: bool
    family: Literal["clip", "siglip"] = Field(
        description="clip: rank probabilities are a softmax; siglip: a sigmoid with logit_bias"
    )


class HealthResult(BaseModel):
    status: Literal["ok", "unavailable"]
    default_model: str
    models: list[ModelHealth]
