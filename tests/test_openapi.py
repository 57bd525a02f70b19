"""The OpenAPI document the service serves: BentoML's, rewritten through the adapter (the whole
document is checked against the running service by schemathesis in
tests/integration/test_inputs.py)."""

from __future__ import annotations

from typing import Any

import bentoml
import pytest

from clip_runtime.settings import ClipSettings
from clip_service.bentoml_adapter import document_openapi
from clip_service.openapi import _openapi_30, _request_schemas


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
