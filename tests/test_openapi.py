"""The OpenAPI document the service serves: BentoML's, rewritten through the adapter (the whole
document is checked against the running service by schemathesis in
tests/integration/test_inputs.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import bentoml
import pytest
from pydantic import BaseModel

from clip_runtime.settings import ClipSettings
from clip_service.bentoml_adapter import document_openapi
from clip_service.openapi import (
    ERROR_STATUSES,
    OPENAI_EMBEDDINGS,
    OPENAI_ERROR_STATUSES,
    _fields,
    _openapi_30,
    _request_schemas,
    openai_request_schema,
    service_document,
    text_schema,
)
from clip_service.schemas import served_model_field

SIZES = {"ViT-B-32": 512}


@bentoml.service(name="openapi-probe")
class _Probe:
    @bentoml.api(route="/probe")
    def probe(self, text: str) -> str:
        return text


def test_the_rewritten_document_is_what_the_service_serves() -> None:
    generated = _Probe.openapi_spec.asdict()
    assert generated["info"]["version"] == "None"  # BentoML's own: why the rewrite exists

    def rewrite(spec: dict[str, Any]) -> dict[str, Any]:
        return spec | {"info": {"title": "probe", "version": "1.2.3", "description": "d"}}

    document_openapi(_Probe, rewrite)
    served = _Probe.openapi_spec.asdict()
    assert served["info"] == {"title": "probe", "version": "1.2.3", "description": "d"}
    assert served["paths"] == generated["paths"]


def test_nullable_fields_are_declared_nullable() -> None:
    pydantic = {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Pretrained"}
    assert _openapi_30(pydantic) == {"type": "string", "nullable": True, "title": "Pretrained"}
    ref = {"anyOf": [{"$ref": "#/components/schemas/ItemError"}, {"type": "null"}]}
    assert _openapi_30(ref) == {
        "allOf": [{"$ref": "#/components/schemas/ItemError"}],
        "nullable": True,
    }


@pytest.mark.parametrize(
    "route", ["/evaluator/v1/evaluation/single", "/evaluator/v1/embeddings/text"]
)
def test_requests_declare_the_limits_the_service_enforces(route: str) -> None:
    settings = ClipSettings(models=["ViT-B-32"], max_text_chars=50, max_batch_items=7)
    schema = _request_schemas(settings)[route]
    text = schema["properties"].get("text") or schema["properties"]["texts"]["items"]
    assert (text["minLength"], text["maxLength"]) == (1, 50)
    assert schema["properties"]["model"]["enum"] == ["ViT-B-32"]
    if "texts" in schema["properties"]:
        assert (
            schema["properties"]["texts"]["minItems"],
            schema["properties"]["texts"]["maxItems"],
        ) == (1, 7)


def _bentoml_like_spec(settings: ClipSettings, extra_route: str) -> dict[str, Any]:
    """A document shaped as BentoML 1.4.40 generates it: the service's routes, one more API,
    its infrastructure routes and its own error components."""
    ref = "#/components/schemas/"
    bentoml_errors = {
        400: {"content": {"application/json": {"schema": {"$ref": f"{ref}InvalidArgument"}}}},
        404: {"content": {"application/json": {"schema": {"$ref": f"{ref}NotFound"}}}},
    }

    def api(fields: set[str]) -> dict[str, Any]:
        body = {"schema": {"properties": {field: {} for field in fields}}}
        return {
            "post": {
                "x-bentoml-name": "api",
                "requestBody": {"content": {"application/json": body}},
                # BentoML's own dict keys its statuses by int
                "responses": {200: {"description": "ok"}, **bentoml_errors},
            }
        }

    paths = {route: api(_fields(schema)) for route, schema in _request_schemas(settings).items()}
    paths[extra_route] = api({"prompt"})
    paths[OPENAI_EMBEDDINGS] = api({"input", "model", "encoding_format", "dimensions", "user"})
    paths["/readyz"] = {"get": {"responses": {"200": {"description": "ready"}}}}
    components = {"InvalidArgument": {}, "NotFound": {}, "ExtraInput": {"type": "object"}}
    return {"openapi": "3.0.2", "info": {}, "paths": paths, "components": {"schemas": components}}


def test_every_api_route_declares_the_error_envelope() -> None:
    """An API the rewrite has no request schema for (one added later) still declares the
    service's error body for every status instead of BentoML's; its own components stay."""
    settings = ClipSettings(models=["ViT-B-32"])
    document = service_document(
        _bentoml_like_spec(settings, "/evaluator/v1/extra"), settings, SIZES
    )
    extra = document["paths"]["/evaluator/v1/extra"]["post"]["responses"]
    assert set(extra) == {"200"} | {str(status) for status in ERROR_STATUSES}
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    assert extra["422"]["content"]["application/json"]["schema"] == envelope
    schemas = document["components"]["schemas"]
    assert (
        "ExtraInput" in schemas and "InvalidArgument" not in schemas and "NotFound" not in schemas
    )
    assert document["info"]["title"] == "CLIP score service"
    # A route outside /evaluator/ answers in a shape of its own: its responses are left alone,
    # and the BentoML schemas they refer to stay.
    other = service_document(_bentoml_like_spec(settings, "/v1/other"), settings, SIZES)
    kept = other["paths"]["/v1/other"]["post"]["responses"]
    assert set(kept) == {200, 400, 404}
    assert {"InvalidArgument", "NotFound"} <= set(other["components"]["schemas"])
    assert document["info"]["version"] not in ("", "None")


def test_a_caption_schema_allows_only_words_the_tokenizer_accepts() -> None:
    pattern = re.compile(text_schema(ClipSettings(max_text_word_chars=5))["pattern"])
    for accepted in ("a", " two words ", "abcde x", "tab\tand\nline"):
        assert pattern.match(accepted), accepted
    for refused in ("", "   ", "abcdef", "ok abcdef", "nul\x00"):
        assert not pattern.match(refused), refused


def test_openai_embeddings_document_one_shape_per_model_in_openai_error_shape() -> None:
    settings = ClipSettings(models=["ViT-B-32", "ViT-L-14"], max_batch_items=7)
    request = openai_request_schema(settings, {"ViT-B-32": 512, "ViT-L-14": 768})
    shapes = {s["properties"]["model"]["enum"][0]: s["properties"] for s in request["oneOf"]}
    assert shapes["ViT-L-14"]["dimensions"]["enum"] == [768]
    assert shapes["ViT-B-32"]["input"]["oneOf"][1]["maxItems"] == 7
    single = ClipSettings(models=["ViT-B-32"])
    document = service_document(_bentoml_like_spec(single, "/v1/other"), single, SIZES)
    operation = document["paths"][OPENAI_EMBEDDINGS]["post"]
    assert set(operation["responses"]) == {"200"} | {str(s) for s in OPENAI_ERROR_STATUSES}
    shape = {"$ref": "#/components/schemas/ErrorResponse"}
    assert operation["responses"]["404"]["content"]["application/json"]["schema"] == shape
    assert operation["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "input",
        "model",
    ]


def test_a_model_field_names_the_served_models_when_documented_not_when_declared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read: list[ClipSettings] = []

    def settings() -> ClipSettings:
        read.append(ClipSettings(models=["ViT-B-32", "ViT-L-14"], default_model="ViT-L-14"))
        return read[-1]

    monkeypatch.setattr("clip_service.schemas.get_settings", settings)

    class Request(BaseModel):
        model: Annotated[str | None, served_model_field("{names} (default `{default}`)")] = None

    assert read == []  # declared (as at import) without reading the settings
    field = Request.model_json_schema()["properties"]["model"]
    assert field["description"] == "`ViT-B-32`, `ViT-L-14` (default `ViT-L-14`)"
    assert field["examples"] == ["ViT-B-32", "ViT-L-14"]
