"""The OpenAI-compatible door's pieces without a server: its error shapes and statuses through the
real middleware stack, input handling, base64 as OpenAI's clients decode it, token counts, and
its place in BentoML's OpenAPI document (the end-to-end run with the `openai` package is in
tests/integration/test_inputs.py)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
from starlette.requests import Request
from starlette.responses import Response

from clip_runtime import errors as E
from clip_runtime.settings import ClipSettings
from clip_runtime.tokens import TextTokenizer
from clip_service.admission import InFlightLimitMiddleware
from clip_service.bentoml_adapter import document_plain_routes
from clip_service.middleware import middleware_stack, wrap
from clip_service.observability import service_metrics
from clip_service.openai_api import (
    FieldError,
    check_dimensions,
    encode_embedding,
    input_items,
    openai_errors,
    reshape_error,
)
from clip_service.openai_schemas import ImageItem, ModelList, TextItem
from clip_testkit.guard import guarded

KEY = "a-key-0123456789"
PREFIXES = ("/evaluator/", "/v1/")


def app_answering(status: int, body: dict[str, Any]) -> Callable[..., Any]:
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def front_end(app: Callable[..., Any]) -> Any:
    """``app`` inside the front end's whole middleware stack (OpenAI's shapes included)."""
    return guarded(
        app,
        api_keys=[KEY],
        max_request_bytes=1024,
        retry_after_s=3,
    )


def post(app: Any, path: str, key: str | None = KEY, body: bytes = b"{}") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            return await client.post(path, content=body, headers=headers)

    return asyncio.run(send())


def test_the_guards_refusals_on_v1_come_in_openais_shape() -> None:
    app = front_end(app_answering(200, {"ok": True}))
    missing = post(app, "/v1/embeddings", key=None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    error = missing.json()["error"]
    assert error == {
        "message": "a valid API key is required",
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
        "request_id": missing.headers["x-request-id"],
    }
    too_large = post(app, "/v1/embeddings", body=b"x" * 2000)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    assert post(app, "/v1/embeddings").json() == {"ok": True}  # success passes untouched
    # The native routes keep their own envelope.
    native = post(app, "/evaluator/v1/embeddings/text", key="wrong").json()["error"]
    assert "type" not in native and native["code"] == "unauthorized"


def test_overload_on_v1_is_a_503_with_retry_after_in_openais_shape() -> None:
    layers = middleware_stack(ClipSettings(api_keys=[KEY], retry_after_s=3), {}, {})
    in_flight, options = layers[-1]
    assert in_flight is InFlightLimitMiddleware
    layers[-1] = (in_flight, options | {"limit": 0})  # every request over the limit
    shed = post(wrap(app_answering(200, {}), layers), "/v1/embeddings")
    assert shed.status_code == 503 and shed.headers["retry-after"] == "3"
    error = shed.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "overloaded")
    assert error["request_id"] == shed.headers["x-request-id"]


@pytest.mark.parametrize(
    ("status", "error", "expected_status", "expected"),
    [
        # an input the model cannot use: OpenAI's 400
        (422, {"code": "invalid_image", "message": "m"}, 400, ("invalid_request_error", None)),
        (422, {"code": "unknown_model", "message": "m"}, 404, ("not_found_error", None)),
        (415, {"code": "unsupported_image_format", "message": "m"}, 400, (None, None)),
        (413, {"code": "too_many_items", "message": "m"}, 413, ("invalid_request_error", None)),
        # BentoML's validation error, as the guard rewrote it: the field becomes `param`
        (
            400,
            {"code": "invalid_request", "message": "m", "detail": [{"loc": ["encoding_format"]}]},
            400,
            ("invalid_request_error", "encoding_format"),
        ),
    ],
)
def test_our_errors_get_openais_statuses(
    status: int, error: dict[str, Any], expected_status: int, expected: tuple[str | None, ...]
) -> None:
    answer = post(front_end(app_answering(status, {"error": error})), "/v1/embeddings")
    assert answer.status_code == expected_status
    shaped = answer.json()["error"]
    assert shaped["code"] == error["code"] and shaped["message"] == "m"
    kind, param = expected
    assert kind is None or shaped["type"] == kind
    assert shaped["param"] == param


def test_an_answer_already_in_openais_shape_is_kept() -> None:
    body = json.dumps({"error": {"message": "m", "type": "t", "param": "p", "code": "c"}}).encode()
    assert reshape_error(400, body) == (400, body)
    status, plain = reshape_error(502, b"Bad Gateway")
    assert status == 502 and json.loads(plain)["error"]["type"] == "server_error"


class Handlers:
    @openai_errors
    async def fails(self, ctx: bentoml.Context, model: str, error: Exception) -> dict[str, int]:
        raise error


def run_handler(error: Exception) -> tuple[Response, int]:
    async def call() -> tuple[Response, int]:
        ctx = bentoml.Context()
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
        with ctx.in_request(request):
            response = await Handlers().fails(ctx=ctx, model="ViT-B-32", error=error)
            return response, ctx.response.status_code  # type: ignore[return-value]

    return asyncio.run(call())


def test_handler_errors_name_their_field_and_are_counted() -> None:
    counted = service_metrics().errors.labels("empty_text")
    before = counted._value.get()
    response, status = run_handler(FieldError(E.EmptyTextError("input[2]: text is empty"), "input"))
    assert response.status_code == status == 400
    assert json.loads(response.body)["error"] == {
        "message": "input[2]: text is empty",
        "type": "invalid_request_error",
        "param": "input",
        "code": "empty_text",
        "request_id": None,  # the guard adds it
    }
    assert counted._value.get() == before + 1
    response, status = run_handler(E.ModelNotReadyError("loading"))
    assert status == 503 and json.loads(response.body)["error"]["param"] is None


def test_input_items_keep_order_and_refuse_token_arrays() -> None:
    image = ImageItem(image="data:image/png;base64,AAAA")
    assert input_items("a cat") == [TextItem(text="a cat")]
    assert input_items(["a", image, TextItem(text="b")]) == [
        TextItem(text="a"),
        image,
        TextItem(text="b"),
    ]
    for token_arrays in ([15339, 1917], [[15339, 1917]]):
        with pytest.raises(E.InvalidRequestError, match="check_embedding_ctx_length=False"):
            input_items(token_arrays)
    with pytest.raises(E.InvalidRequestError, match="input is empty"):
        input_items([])


def test_base64_embeddings_decode_as_openais_clients_decode_them() -> None:
    vector = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    encoded = encode_embedding(vector, "base64")
    assert isinstance(encoded, str)
    # openai-python: np.frombuffer(base64.b64decode(data), dtype="float32")
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), vector)
    assert encode_embedding(vector, "float") == vector.tolist()


def test_dimensions_other_than_the_models_are_refused() -> None:
    check_dimensions(None, 512)
    check_dimensions(512, 512)
    for asked in (256, 1024):
        with pytest.raises(E.InvalidRequestError, match="512 dimensions"):
            check_dimensions(asked, 512)


def test_token_counts_are_the_tokens_the_model_encodes(b32_model_dir: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = TextTokenizer(b32_model_dir)
    caption = "a photo of a cat on a bridge"
    assert tokenizer.encoded_token_count(caption) == len(SimpleTokenizer().encode(caption)) + 2
    # A caption beyond the context is cut to it: the rest is not encoded, so not counted.
    assert tokenizer.encoded_token_count("cat " * 200) == tokenizer.context_length == 77


def test_plain_routes_get_a_place_in_bentomls_openapi_document() -> None:
    @bentoml.service(name="openapi-probe")
    class Probe:
        @bentoml.api
        def ping(self) -> str:
            return "pong"

    listing = {"get": {"responses": {"200": {"description": "the models"}}}}
    document_plain_routes(Probe, {"/v1/models": listing}, [ModelList])
    spec = Probe.openapi_spec.asdict()
    assert spec["paths"]["/v1/models"]["get"]["responses"]["200"]["description"] == "the models"
    assert "/ping" in spec["paths"]
    assert {"ModelList", "ModelCard"} <= set(spec["components"]["schemas"])
