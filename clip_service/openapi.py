"""The service's own OpenAPI document (``/docs.json``, shown at ``/evaluator/docs``).

BentoML generates a document from the API signatures, but declares only 400/404/500 with a body
that is not ours, drops ``null`` from nullable fields and knows none of the limits, so a client
(or a fuzzer) built from it is wrong. ``service_document`` rewrites it: the service's name and
version, the error envelope for every status a route answers, the request constraints the
service enforces (taken from the settings), nullable answers, and the plain routes.
"""

from __future__ import annotations

import copy
import json
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from clip_runtime.settings import ClipSettings
from clip_service.schemas import (
    BatchResult,
    EmbeddingsResult,
    HealthResult,
    RankResult,
    SingleResult,
)

TITLE = "CLIP score service"
DESCRIPTION = """How well a caption matches an image: the CLIP score of OpenCLIP models.

`score` = 100 * max(cosine, 0); the raw `cosine` is always returned beside it. Answers name the
model, its pretrained tag and its weights: `"weights": "random-init"` means untrained weights
(for trying the API offline); their scores carry no meaning and are mostly 0.

Every error has one body: `{"error": {"code", "message", "request_id", "detail"?}}`; the
`x-request-id` header carries the same id. `image` fields take base64, a `data:` URI or an
http(s) URL (fetched by the service)."""
# What POST /v1/embeddings answers besides 200, in OpenAI's error shape (clip_service.openai_api:
# our 415 and 422 are its 400, an unknown model its 404).
OPENAI_ERROR_STATUSES = {
    400: "invalid_request_error: a malformed request, or an input the model cannot use",
    401: "authentication_error: API keys are on and the bearer token is missing or wrong",
    404: "not_found_error: the model is not served",
    408: "request_timeout: the body did not arrive in time",
    413: "request_too_large, image_too_large, too_many_items",
    500: "server_error: a bug; quote the request_id",
    503: "overloaded or model_not_ready; retry after Retry-After seconds",
}
OPENAI_EMBEDDINGS = "/v1/embeddings"
PACKAGE = "clip-score-service"
SCHEMAS = "#/components/schemas/"
IMAGE_FORMAT = "image"  # a string holding an image: base64, data: URI or http(s) URL

# What each scoring route can answer besides 200 (clip_service/http_errors.py and the middleware):
# 400 a malformed request, 401 a missing key, 408 a slow body, 413 over a size limit, 415 an image
# format not served, 422 a value refused, 500 a bug, 503 shed or the model worker unreachable.
ERROR_STATUSES = {
    400: "invalid_request: malformed JSON or form, a missing, unknown or mistyped field",
    401: "unauthorized: API keys are on and the bearer token is missing or wrong",
    408: "request_timeout: the body did not arrive in time",
    413: "request_too_large, image_too_large, image_dimensions_too_large, too_many_items",
    415: "unsupported_image_format",
    422: "invalid_image, image_too_small, image_aspect_ratio_too_large, image_too_many_scans, "
    "empty_text, invalid_text, text_too_long, unknown_model, invalid_url, url_not_allowed, "
    "url_fetch_failed",
    500: "internal_error: a bug; quote the request_id",
    503: "overloaded or model_not_ready; retry after Retry-After seconds",
}
EVALUATOR_PREFIX = "/evaluator/"  # the routes that answer errors in ERROR_ENVELOPE's shape
# BentoML's error bodies (not this service's) and its task API's status: dropped once unused.
BENTOML_ONLY = {"InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"}
OUTPUTS: dict[str, type[BaseModel]] = {
    "/evaluator/v1/evaluation/single": SingleResult,
    "/evaluator/v1/evaluation/single/upload": SingleResult,
    "/evaluator/v1/evaluation/batch": BatchResult,
    "/evaluator/v1/evaluation/rank": RankResult,
    "/evaluator/v1/embeddings/image": EmbeddingsResult,
    "/evaluator/v1/embeddings/text": EmbeddingsResult,
}

ERROR_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable error code"},
                "message": {"type": "string", "description": "what to fix"},
                "request_id": {
                    "type": "string",
                    "description": "also in the x-request-id header; absent only on a 408 "
                    "for headers that never completed",
                },
                "detail": {
                    "type": "array",
                    "description": "schema violations, one per field",
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string"},
                            "loc": {"type": "array", "items": {}},
                            "msg": {"type": "string"},
                        },
                    },
                },
            },
        }
    },
}


def service_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # a Bento without the package's metadata
        return "unknown"


def _openapi_30(schema: Any) -> Any:
    """A pydantic (JSON Schema 2020-12) schema as OpenAPI 3.0 reads it: ``anyOf [X, null]``
    becomes ``X`` with ``nullable: true``; ``$defs`` refs point into components."""
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    null = {"type": "null"}
    options = schema.get("anyOf")
    if options and null in options:
        schema = {key: value for key, value in schema.items() if key != "anyOf"}
        rest = [option for option in options if option != null]
        if len(rest) == 1 and "$ref" in rest[0]:
            schema["allOf"] = rest  # siblings of a $ref are ignored in OpenAPI 3.0
        elif len(rest) == 1:
            schema.update(rest[0])
        else:
            schema["anyOf"] = rest
        schema["nullable"] = True
    return {key: _openapi_30(value) for key, value in schema.items()}
    return schema


def text_schema(settings: ClipSettings) -> dict[str, Any]:
    """A caption the service accepts: not blank, no NUL, and no run of more than
    ``max_text_word_chars`` characters without a space (the tokenizer's words are never longer
    than such a run, so whatever this allows passes its word limit)."""
    word = rf"[^\s\x00]{{1,{settings.max_text_word_chars}}}"
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": settings.max_text_chars,
        "pattern": rf"^\s*{word}(\s+{word})*\s*$",
    }


def _image_schema() -> dict[str, Any]:
    return {
        "type": "string",
        "format": IMAGE_FORMAT,
        "minLength": 1,
        "description": "base64 (standard or URL-safe), a data:image URI or an http(s) URL",
    }


def _closed(required: list[str], **properties: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": False,
    }


def openai_request_schema(settings: ClipSettings, dimensions: dict[str, int]) -> dict[str, Any]:
    """What ``POST /v1/embeddings`` accepts: one shape per served model, since ``dimensions``
    may only be that model's own embedding size. Token arrays are refused with a message (the
    API's type has them for that) and so are not declared."""
    text = text_schema(settings)
    item = {
        "oneOf": [
            text,
            _closed(["text"], text=text),
            _closed(["image"], image=_image_schema()),
        ]
    }
    items = {"type": "array", "items": item, "minItems": 1, "maxItems": settings.max_batch_items}
    shapes = [
        _closed(
            ["input", "model"],
            input={"oneOf": [text, items]},
            model={"type": "string", "enum": [name]},
            encoding_format={"type": "string", "enum": ["float", "base64"], "default": "float"},
            dimensions={"type": "integer", "enum": [size], "nullable": True, "default": None},
            user={"type": "string", "nullable": True, "default": None},
        )
        for name, size in dimensions.items()
    ]
    return shapes[0] if len(shapes) == 1 else {"oneOf": shapes}


def _model_schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(mode="serialization", ref_template=SCHEMAS + "{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = _openapi_30(definition)
    components[model.__name__] = _openapi_30(schema)
    return {"$ref": SCHEMAS + model.__name__}


def _request_schemas(settings: ClipSettings) -> dict[str, dict[str, Any]]:
    """What each route accepts: the limits the service enforces, so that whatever this schema
    allows is scored (an image's content is the only thing it cannot say)."""
    image = _image_schema()
    text = text_schema(settings)
    model = {
        "type": "string",
        "enum": list(settings.models),
        "nullable": True,
        "default": None,
        "description": f"a served model (default {settings.default_model})",
    }

    def listed(item: dict[str, Any], most: int) -> dict[str, Any]:
        return {"type": "array", "items": item, "minItems": 1, "maxItems": most}

    # A form field has no null: a missing `model` part is the default.
    form_model = {key: value for key, value in model.items() if key not in ("nullable", "default")}
    references = listed(text, settings.max_candidates) | {"nullable": True, "default": None}
    scale = {"type": "string", "enum": ["torchmetrics", "paper"], "default": "torchmetrics"}

    body = _closed
    # A batch item's image, text and references are checked per item: a bad one fails that
    # item (its `error` in a 200 answer), never the request, so the schema leaves them open.
    anything = {"type": "string", "nullable": True}
    batch_item = body(
        [],
        image=anything | {"description": image["description"]},
        text=anything,
        references={"type": "array", "items": {"type": "string"}, "nullable": True},
    )
    batch_item["description"] = "a pair; a missing or bad image or text fails this item alone"
    candidates = settings.max_candidates
    return {
        "/evaluator/v1/evaluation/single": body(
            ["image", "text"],
            image=image,
            text=text,
            model=model,
            references=references,
            scale=scale,
        ),
        "/evaluator/v1/evaluation/batch": body(
            ["items"],
            items=listed(batch_item, settings.max_batch_items),
            model=model,
            scale=scale,
        ),
        "/evaluator/v1/evaluation/rank": {
            "oneOf": [
                body(["image", "texts"], image=image, texts=listed(text, candidates), model=model),
                body(["images", "text"], images=listed(image, candidates), text=text, model=model),
            ]
        },
        "/evaluator/v1/embeddings/image": body(
            ["images"], images=listed(image, settings.max_batch_items), model=model
        ),
        "/evaluator/v1/embeddings/text": body(
            ["texts"], texts=listed(text, settings.max_batch_items), model=model
        ),
        "/evaluator/v1/evaluation/single/upload": body(
            ["image", "text"],
            image={"type": "string", "format": "binary", "description": "the image file"},
            text=text,
            model=form_model,
        ),
    }


def _declared_fields(request_body: dict[str, Any]) -> set[str]:
    for media in request_body["content"].values():
        return set(media["schema"].get("properties", {}))
    return set()


def _fields(schema: dict[str, Any]) -> set[str]:
    options = schema.get("oneOf", [schema])
    return {name for option in options for name in option["properties"]}


def _error_responses(
    statuses: dict[int, str], envelope_name: str = "ErrorEnvelope"
) -> dict[str, Any]:
    envelope = {"application/json": {"schema": {"$ref": SCHEMAS + envelope_name}}}
    responses: dict[str, Any] = {}
    for status, description in statuses.items():
        responses[str(status)] = {"description": description, "content": envelope}
    retry = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    responses["503"]["headers"] = retry
    return responses


def _plain_routes(components: dict[str, Any]) -> dict[str, Any]:
    health = {"application/json": {"schema": _model_schema(HealthResult, components)}}
    text = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}

    def get(description: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {
            "get": {"tags": ["Service APIs"], "description": description, "responses": responses}
        }

    return {
        "/evaluator/health": get(
            "Per served model: tag, weights, device, dtype, ready. 200 when every model is "
            "ready, 503 (the same document, status unavailable) otherwise. Never needs a key.",
            {
                "200": {"description": "every model ready", "content": health},
                "503": {"description": "a model is not ready", "content": health},
            },
        ),
        "/evaluator/metrics": get(
            "Prometheus text: BentoML's request metrics and the service's own (clip_*).",
            {"200": {"description": "Prometheus exposition format", "content": text}},
        ),
        "/evaluator/demo": get(
            "A page to try the service: upload an image, type captions, see their scores.",
            {"200": {"description": "the demo page", "content": html}},
        ),
    }


def _success(responses: dict[Any, Any]) -> Any:
    """The 200 answer of a generated operation (BentoML's dict keys statuses by int)."""
    return responses[200] if 200 in responses else responses["200"]


def _document_openai(document: dict[str, Any], request: dict[str, Any]) -> None:
    """``POST /v1/embeddings``: its constraints, and OpenAI's error shape for its statuses."""
    operation = document["paths"][OPENAI_EMBEDDINGS]["post"]
    operation["requestBody"]["required"] = True
    for media in operation["requestBody"]["content"].values():
        media["schema"] = request
    operation["responses"] = {
        "200": _success(operation["responses"]),
        **_error_responses(OPENAI_ERROR_STATUSES, "ErrorResponse"),
    }


def service_document(
    spec: dict[str, Any], settings: ClipSettings, dimensions: dict[str, int]
) -> dict[str, Any]:
    """``spec`` (BentoML's document, as a dict) made true for this service; ``dimensions``: each
    served model's embedding size."""
    document = copy.deepcopy(spec)
    document["info"] = {"title": TITLE, "description": DESCRIPTION, "version": service_version()}
    components: dict[str, Any] = {"ErrorEnvelope": ERROR_ENVELOPE}
    requests = _request_schemas(settings)
    for route, schema in requests.items():
        operation = document["paths"][route]["post"]
        declared = _declared_fields(operation["requestBody"])
        if declared != _fields(schema):  # the API's signature changed: update _request_schemas
            raise RuntimeError(f"{route}: the OpenAPI request fields {declared} drifted")
        operation["requestBody"]["required"] = True
        for media in operation["requestBody"]["content"].values():
            media["schema"] = schema
        answer = {"application/json": {"schema": _model_schema(OUTPUTS[route], components)}}
        operation["responses"] = {
            "200": {"description": "scored", "content": answer},
            **_error_responses(ERROR_STATUSES),
        }
    for route, path_item in document["paths"].items():
        operation = path_item.get("post", {})
        added = "x-bentoml-name" in operation and route not in requests  # an API added since
        if added and route.startswith(EVALUATOR_PREFIX):  # other prefixes answer in their shape
            operation["responses"] = {
                "200": _success(operation["responses"]),
                **_error_responses(ERROR_STATUSES),
            }
    _document_openai(document, openai_request_schema(settings, dimensions))
    document["paths"].update(_plain_routes(components))
    readiness = document["paths"]["/readyz"]["get"]["responses"]
    readiness["503"] = {"description": "a model or the front end is not ready yet"}
    generated = spec.get("components", {}).get("schemas", {})
    text = json.dumps(document["paths"])
    unused = {name for name in BENTOML_ONLY if f'"{SCHEMAS}{name}"' not in text}
    kept = {name: schema for name, schema in generated.items() if name not in unused}
    document["components"] = {"schemas": kept | components}
    return document
