"""Wire types: what the HTTP API accepts and answers (the OpenAPI document is generated from
them). Optional scores appear only when asked for, so plain answers keep the plain contract."""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonDict
from pydantic_core import InitErrorDetails, PydanticCustomError

from clip_runtime.settings import get_settings

Scale = Literal["torchmetrics", "paper"]


def served_model_field(description: str) -> FieldInfo:
    """An endpoint's ``model`` field (``Annotated[str | None, served_model_field(...)]``),
    documented with the served models: ``description`` names them as ``{names}`` and the default
    as ``{default}``. The served models are settings, so they are filled in (with the names as
    examples) whenever a schema is generated (/docs.json, /schema.json, `bentoml build`), never
    when the field is declared: importing the handlers reads no settings."""

    def name_served_models(schema: JsonDict) -> None:
        settings = get_settings()
        names = ", ".join(f"`{name}`" for name in settings.models)
        schema["description"] = description.format(names=names, default=settings.default_model)
        schema["examples"] = list(settings.models)

    return Field(json_schema_extra=name_served_models)


# How many unknown fields an error names (the rest are counted): an answer to a body of a
# million unknown keys stays small, and the million errors are never built.
MAX_NAMED_UNKNOWN_FIELDS = 10
# How much of a client's field name an error repeats.
MAX_ECHOED_FIELD_NAME = 64
MORE_UNKNOWN_FIELDS = "unknown_fields_more"  # the error type that counts the rest


def echoed(name: Any) -> Any:
    """A client's field name as an error repeats it: cut to ``MAX_ECHOED_FIELD_NAME``."""
    if isinstance(name, str) and len(name) > MAX_ECHOED_FIELD_NAME:
        return name[:MAX_ECHOED_FIELD_NAME] + "..."
    return name


def refuse_unknown_fields(model: type[BaseModel], data: Any) -> Any:
    """A before-validator for a model with ``extra="forbid"``: ``data`` unchanged when it has
    at most ``MAX_NAMED_UNKNOWN_FIELDS`` keys ``model`` lacks (pydantic names each); else a
    ``ValidationError`` with one ``extra_forbidden`` item for each of the first
    ``MAX_NAMED_UNKNOWN_FIELDS`` unknown keys and one ``unknown_fields_more`` item counting the
    rest, instead of pydantic's one item per unknown key."""
    if not isinstance(data, dict) or len(data) <= len(model.model_fields):
        return data  # too few keys to hold more unknown ones than pydantic may name
    unknown = (key for key in data if key not in model.model_fields)
    named = list(itertools.islice(unknown, MAX_NAMED_UNKNOWN_FIELDS))
    more = sum(1 for _ in unknown)
    if not more:
        return data
    errors = [
        InitErrorDetails(type="extra_forbidden", loc=(echoed(key),), input=None) for key in named
    ]
    counted = PydanticCustomError(
        MORE_UNKNOWN_FIELDS, "{count} more unknown fields", {"count": more}
    )
    errors.append(InitErrorDetails(type=counted, loc=(), input=None))
    raise ValidationError.from_exception_data(model.__name__, errors)


def _absent(value: object) -> bool:
    return value is None


class ItemError(BaseModel):
    code: str
    message: str


class SingleResult(BaseModel):
    score: float = Field(description="100 * max(cosine, 0), torchmetrics' CLIPScore scale")
    cosine: float = Field(description="cosine of the L2-normalized image and text embeddings")
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

    @model_validator(mode="before")
    @classmethod
    def _bounded_unknown_fields(cls, data: Any) -> Any:
        return refuse_unknown_fields(cls, data)


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
    embeddings: list[list[float]] = Field(description="L2-normalized float32, request order")
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
