"""The request guard and the framing check on their own: ambiguous lengths close the connection,
a client that leaves mid-body is a 499 (not a server error), an answer shows one request id, and
an upload route takes forms only, with declared fields only."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from clip_service.framing import AmbiguousLengthMiddleware
from clip_testkit.guard import call, guarded

UPLOAD = "/evaluator/up"


def scope_for(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 3000),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
    }


async def bentoml_like(request: Request) -> JSONResponse:
    """Reads the body as BentoML's endpoint does, answering 500 for any exception it raises,
    and sets BentoML's own request-id header."""
    try:
        body = await request.body()
    except Exception:
        response = JSONResponse({"error": "An unexpected error has occurred"}, status_code=500)
    else:
        response = JSONResponse({"bytes": len(body)}, status_code=400 if not body else 200)
    response.headers["X-BentoML-Request-ID"] = "1234567890"
    return response


def guard() -> ASGIApp:
    app = Starlette(
        routes=[
            Route("/evaluator/echo", bentoml_like, methods=["POST"]),
            Route(UPLOAD, bentoml_like, methods=["POST"]),
        ]
    )
    return guarded(
        app,
        file_fields={UPLOAD: frozenset({"image"})},
        input_fields={UPLOAD: ("image", "text", "model")},
        max_request_bytes=10_000,
        body_timeout_s=5,
        body_min_rate_bytes_s=1000,
    )


def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    messages = [
        {"type": "http.request", "body": b'{"te', "more_body": True},
        {"type": "http.disconnect"},
    ]
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    with caplog.at_level(logging.INFO):
        status, _, body = call(guard(), scope_for("/evaluator/echo", headers), messages)
    assert status == 499
    assert body["error"]["code"] == "client_closed_request"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_form_whose_client_leaves_mid_body_is_a_499() -> None:
    request = httpx.Request("POST", "http://x/", files={"image": ("x.jpg", b"\xff" * 100)})
    messages = [
        {"type": "http.request", "body": request.read()[:50], "more_body": True},
        {"type": "http.disconnect"},
    ]
    content_type = request.headers["content-type"].encode()
    status, _, body = call(guard(), scope_for(UPLOAD, [(b"content-type", content_type)]), messages)
    assert status == 499 and body["error"]["code"] == "client_closed_request"


def test_an_answer_carries_one_request_id() -> None:
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    scope = scope_for("/evaluator/echo", [(b"x-request-id", b"my-id-1")])
    status, headers, body = call(guard(), scope, messages)
    assert status == 400
    assert headers[b"x-request-id"] == headers[b"x-bentoml-request-id"] == b"my-id-1"
    assert body["error"]["request_id"] == "my-id-1"


@pytest.mark.parametrize(
    "content_type", [b"application/x-www-form-urlencoded", b"application/json", b"text/plain"]
)
def test_an_upload_route_takes_forms_only(content_type: bytes) -> None:
    messages = [{"type": "http.request", "body": b"image=http%3A%2F%2Fx%2F", "more_body": False}]
    status, _, body = call(guard(), scope_for(UPLOAD, [(b"content-type", content_type)]), messages)
    assert status == 415
    assert body["error"]["code"] == "unsupported_media_type"
    assert "multipart/form-data" in body["error"]["message"]


def test_an_undeclared_form_part_is_a_400_naming_it() -> None:
    request = httpx.Request(
        "POST", "http://x/", files={"file": ("x.jpg", b"\xff\xd8"), "text": (None, b"a")}
    )
    content_type = request.headers["content-type"].encode()
    messages = [{"type": "http.request", "body": request.read(), "more_body": False}]
    status, _, body = call(guard(), scope_for(UPLOAD, [(b"content-type", content_type)]), messages)
    assert status == 400
    assert "unknown form field 'file' (fields: image, text, model)" in body["error"]["message"]


def test_content_length_with_transfer_encoding_is_refused_and_closed() -> None:
    reached: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(True)
        await JSONResponse({})(scope, receive, send)

    headers = [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")]
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    status, sent_headers, body = call(
        AmbiguousLengthMiddleware(app), scope_for("/evaluator/x", headers), messages
    )
    assert status == 400 and sent_headers[b"connection"] == b"close"
    assert "not both" in body["error"]["message"]
    assert body["error"]["request_id"] == sent_headers[b"x-request-id"].decode()
    assert reached == []
    call(AmbiguousLengthMiddleware(app), scope_for("/x", headers[:1]), messages)
    assert reached == [True]  # one of them alone passes
