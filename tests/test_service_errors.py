"""One error path: a handler raises, ``api_errors`` answers with the envelope and the status of
the one table, sets BentoML's context status, and counts the error."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import bentoml
import pytest
from starlette.requests import Request
from starlette.responses import Response

from clip_runtime import errors as E
from clip_service.http_errors import (
    CURRENT_REQUEST_ID,
    ERROR_STATUS,
    ClientGoneError,
    api_errors,
    http_status,
)
from clip_service.middleware.error_envelope import validation_message
from clip_service.observability import service_metrics

T = TypeVar("T")


class Handlers:
    @api_errors
    async def fails(self, ctx: bentoml.Context, model: str | None = None) -> dict[str, int]:
        raise E.OverloadedError("the model queue is full; retry later")

    @api_errors
    async def works(self, ctx: bentoml.Context, model: str | None = None) -> dict[str, int]:
        return {"ok": 1}


def counted(code: str) -> float:
    return service_metrics().errors.labels(code)._value.get()


async def in_request(call: Callable[[bentoml.Context], Awaitable[T]]) -> tuple[T, int]:
    """Run ``call`` the way BentoML runs a handler: inside its request context."""
    ctx = bentoml.Context()
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
    with ctx.in_request(request):
        result = await call(ctx)
        return result, ctx.response.status_code


def test_raised_domain_error_becomes_the_envelope_with_its_status() -> None:
    before = counted("overloaded")
    response, status = asyncio.run(
        in_request(lambda ctx: Handlers().fails(ctx=ctx, model="ViT-B-32"))
    )
    assert isinstance(response, Response)
    assert response.status_code == 503 and status == 503
    assert json.loads(response.body) == {
        "error": {"code": "overloaded", "message": "the model queue is full; retry later"}
    }
    assert counted("overloaded") == before + 1


def test_success_passes_through_and_signature_is_kept_for_bentoml() -> None:
    assert asyncio.run(in_request(lambda ctx: Handlers().works(ctx=ctx))) == ({"ok": 1}, 200)
    # BentoML builds the API's input and output schema from the wrapped signature.
    signature = inspect.signature(Handlers.fails)
    assert list(signature.parameters) == ["self", "ctx", "model"]
    assert "dict[str, int]" in str(signature.return_annotation)


@pytest.mark.parametrize("error", sorted(ERROR_STATUS, key=lambda e: e.code))
def test_every_mapped_error_has_a_4xx_or_503_status(error: type[E.ClipError]) -> None:
    status = http_status(error("x"))
    assert 400 <= status < 500 or status == 503


def test_client_gone_is_499_and_unknown_errors_are_500() -> None:
    assert http_status(ClientGoneError()) == 499
    assert http_status(E.ModelStoreError("broken store")) == 500


def test_error_answers_are_logged_with_their_request_id(caplog: pytest.LogCaptureFixture) -> None:
    async def with_id(ctx: bentoml.Context) -> object:
        token = CURRENT_REQUEST_ID.set("req-42")  # what RequestIdMiddleware sets
        try:
            return await Handlers().fails(ctx=ctx)
        finally:
            CURRENT_REQUEST_ID.reset(token)

    with caplog.at_level("INFO", logger="clip_service.http_errors"):
        asyncio.run(in_request(with_id))
    assert "503 overloaded (request req-42): the model queue is full" in caplog.text


# -- validation messages (what the middleware writes for BentoML's 400s) ----------------------

FIELDS = ("image", "text", "model", "references", "scale")


@pytest.mark.parametrize(
    ("detail", "content_type", "expected"),
    [
        (
            [
                {"type": "missing", "loc": ["text"], "msg": "Field required"},
                {"type": "string_type", "loc": ["image"], "msg": "Input should be a valid string"},
            ],
            None,
            "text: field required; image: Input should be a valid string",
        ),
        (
            [{"type": "extra_forbidden", "loc": ["caption"], "msg": "Extra inputs..."}],
            None,
            "unknown field 'caption' (fields: image, text, model, references, scale)",
        ),
        (
            [{"type": "extra_forbidden", "loc": ["items", 0, "caption"], "msg": "Extra..."}],
            None,
            "unknown field 'items[0].caption'",
        ),
        (
            [{"type": "missing", "loc": ["image"], "msg": "Field required"}],
            "application/x-www-form-urlencoded",
            "send JSON with `Content-Type: application/json`: this body was sent as "
            "application/x-www-form-urlencoded (curl -d's default), so none of its fields were "
            "read",
        ),
        (
            [{"type": "json_invalid", "loc": [], "msg": "Invalid JSON: EOF"}],
            None,
            "the body is not valid JSON (Invalid JSON: EOF); send JSON with "
            "`Content-Type: application/json`",
        ),
    ],
)
def test_validation_errors_say_what_to_fix_by_field(
    detail: list[dict[str, object]], content_type: str | None, expected: str
) -> None:
    assert validation_message(detail, FIELDS, content_type) == expected


def test_framework_errors_get_the_envelope_but_health_keeps_its_own_503() -> None:
    """The guard rewrites any error answer under /evaluator/ that is not an envelope yet (a
    framework's plain 503) into one, but health's 503 is its document: the models and why
    they are unavailable, as documented."""
    import httpx

    from clip_testkit.guard import guarded

    document = {"status": "unavailable", "default_model": "m", "models": []}

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        body = json.dumps(document).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    guard = guarded(app, own_error_bodies=frozenset({"/evaluator/health"}))

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://guard") as client:
            return await client.get(path)

    health = asyncio.run(get("/evaluator/health"))
    assert health.status_code == 503 and health.json() == document
    other = asyncio.run(get("/evaluator/other"))
    assert other.status_code == 503
    assert other.json()["error"]["code"] == "service_unavailable"
    assert other.headers["retry-after"] == "1"
