"""Each front-end middleware on its own, and the order of the one list that composes them."""

from __future__ import annotations

import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runtime.settings import ClipSettings
from clip_service.admission import InFlightLimitMiddleware
from clip_service.framing import AmbiguousLengthMiddleware
from clip_service.middleware import middleware_stack, wrap
from clip_service.middleware.api_key import ApiKeyMiddleware
from clip_service.middleware.body import (
    BodyDeadline,
    BodyDeadlineMiddleware,
    BodySizeLimitMiddleware,
    ClientLeftMiddleware,
)
from clip_service.middleware.error_envelope import ErrorEnvelopeMiddleware
from clip_service.middleware.forms import FormGuardMiddleware
from clip_service.middleware.request_id import RequestIdMiddleware
from clip_service.openai_api import OpenAIErrorShapeMiddleware
from clip_testkit.guard import call


def scope_for(
    path: str, headers: Sequence[tuple[bytes, bytes]] = (), method: str = "POST"
) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


def reading_app(status: int = 200, body: bytes = b"{}") -> ASGIApp:
    """Reads the whole body as BentoML does (a refusal in receive becomes its 500), then
    answers ``status`` with ``body`` and the number of bytes it read."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        read = 0
        try:
            while True:
                message = await receive()
                read += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        except Exception:
            status_, body_ = 500, b'{"error": "An unexpected error has occurred"}'
        else:
            status_, body_ = status, body
        headers = [(b"content-type", b"application/json"), (b"x-read", str(read).encode())]
        await send({"type": "http.response.start", "status": status_, "headers": headers})
        await send({"type": "http.response.body", "body": body_})

    return app


def chunks(*parts: bytes) -> list[Message]:
    return [
        {"type": "http.request", "body": part, "more_body": index < len(parts) - 1}
        for index, part in enumerate(parts)
    ]


def test_request_id_is_echoed_when_safe_and_replaces_bentomls() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["state"]["request_id"] == "abc-1"
        headers = [(b"x-bentoml-request-id", b"999")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    _, headers, _ = call(RequestIdMiddleware(app), scope_for("/x", [(b"x-request-id", b"abc-1")]))
    assert headers[b"x-request-id"] == headers[b"x-bentoml-request-id"] == b"abc-1"
    _, headers, _ = call(
        RequestIdMiddleware(reading_app()), scope_for("/x", [(b"x-request-id", b"a b\r\n")])
    )
    assert len(headers[b"x-request-id"]) == 32  # an unsafe id is replaced by a new one


def test_error_envelope_rewrites_framework_errors_under_the_prefix_only() -> None:
    app = ErrorEnvelopeMiddleware(
        reading_app(503, b'{"detail": "busy"}'), own_error_bodies=frozenset({"/evaluator/own"})
    )
    status, headers, body = call(app, scope_for("/evaluator/x"))
    assert status == 503 and body["error"]["code"] == "service_unavailable"
    assert headers[b"retry-after"] == b"1"
    assert headers[b"content-length"] == str(len(json.dumps(body))).encode()
    assert call(app, scope_for("/evaluator/own"))[2] == {"detail": "busy"}
    assert call(app, scope_for("/livez"))[2] == {"detail": "busy"}


def test_error_envelope_hides_internals_of_a_500_and_leaves_successes_alone() -> None:
    crash = ErrorEnvelopeMiddleware(reading_app(500, b'{"error": "Traceback ... secret"}'))
    body = call(crash, scope_for("/evaluator/x"))[2]
    assert "secret" not in json.dumps(body) and body["error"]["code"] == "internal_error"
    assert call(ErrorEnvelopeMiddleware(reading_app()), scope_for("/evaluator/x"))[2] == {}


def test_api_key_is_needed_under_the_prefix_except_open_paths() -> None:
    app = ApiKeyMiddleware(reading_app(), api_keys=("k" * 20,), open_paths=("/evaluator/health",))
    status, headers, body = call(app, scope_for("/evaluator/v1/score"))
    assert status == 401 and headers[b"www-authenticate"] == b'Bearer realm="clip"'
    assert body["error"]["code"] == "unauthorized"
    key = [(b"authorization", b"Bearer " + b"k" * 20)]
    assert call(app, scope_for("/evaluator/v1/score", key))[0] == 200
    assert call(app, scope_for("/evaluator/v1/score", key * 2))[0] == 400
    assert call(app, scope_for("/evaluator/health"))[0] == 200
    assert call(app, scope_for("/docs.json"))[0] == 200  # documentation open by default
    assert call(ApiKeyMiddleware(reading_app()), scope_for("/evaluator/v1/score"))[0] == 200


def test_body_size_limit_refuses_a_declared_or_a_streamed_excess() -> None:
    app = BodySizeLimitMiddleware(reading_app(), max_request_bytes=10)
    status, headers, body = call(app, scope_for("/x", [(b"content-length", b"11")]))
    assert status == 413 and "has 11 bytes; at most 10" in body["error"]["message"]
    assert b"x-read" not in headers  # refused before the app ran
    status, _, body = call(app, scope_for("/x"), chunks(b"x" * 6, b"x" * 6))
    assert status == 413 and body["error"]["message"] == "request body exceeds 10 bytes"
    assert call(app, scope_for("/x"), chunks(b"x" * 5, b"x" * 5))[0] == 200


def test_body_deadline_cuts_a_stalled_body_and_closes_the_connection() -> None:
    app = BodyDeadlineMiddleware(reading_app(), BodyDeadline(timeout_s=0.2, min_rate_bytes_s=1))
    stalled = [{"type": "http.request", "body": b"x", "more_body": True}]  # then nothing
    status, headers, body = call(app, scope_for("/x"), stalled)
    assert status == 408 and headers[b"connection"] == b"close"
    assert body["error"]["code"] == "request_timeout"
    assert call(app, scope_for("/x"), chunks(b"x", b"y"))[0] == 200


def test_a_client_leaving_mid_body_is_a_499_and_after_it_is_not() -> None:
    app = ClientLeftMiddleware(reading_app())
    left = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]
    status, _, body = call(app, scope_for("/x"), left)
    assert status == 499 and "after 2 bytes" in body["error"]["message"]
    assert call(app, scope_for("/x"), chunks(b"ab"))[0] == 200


def test_a_refusal_of_an_outer_guard_passes_an_inner_one_untouched() -> None:
    inner = BodyDeadlineMiddleware(ClientLeftMiddleware(reading_app()), BodyDeadline(5, 1000))
    status, _, body = call(BodySizeLimitMiddleware(inner, 3), scope_for("/x"), chunks(b"abcd"))
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_form_guard_wants_forms_on_upload_routes_and_replays_a_checked_one() -> None:
    app = FormGuardMiddleware(
        reading_app(), {"/evaluator/up": frozenset({"image"})}, {"/evaluator/up": ("image",)}
    )
    json_type = [(b"content-type", b"application/json")]
    assert call(app, scope_for("/evaluator/up", json_type))[0] == 415
    assert call(app, scope_for("/evaluator/up", json_type, method="GET"))[0] == 200
    boundary = b"b0"
    form = b'--b0\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
    form += b"\xff\xd8\r\n--b0--\r\n"
    form_type = [(b"content-type", b"multipart/form-data; boundary=" + boundary)]
    status, headers, _ = call(app, scope_for("/evaluator/up", form_type), chunks(form))
    assert status == 200 and headers[b"x-read"] == str(len(form)).encode()
    extra = form.replace(b'name="image"', b'name="file"')
    status, _, body = call(app, scope_for("/evaluator/up", form_type), chunks(extra))
    assert status == 400 and "unknown form field 'file'" in body["error"]["message"]


def test_the_stack_is_one_list_in_the_order_each_layer_needs() -> None:
    layers = [cls for cls, _ in middleware_stack(ClipSettings(), {}, {})]
    assert layers == [
        AmbiguousLengthMiddleware,  # closes the connection: before any other answer
        RequestIdMiddleware,  # every answer below carries the id
        OpenAIErrorShapeMiddleware,  # reshapes the envelope under /v1/ for OpenAI's clients
        ErrorEnvelopeMiddleware,  # sees every error answer below
        ApiKeyMiddleware,  # before any body is read
        BodySizeLimitMiddleware,
        BodyDeadlineMiddleware,
        ClientLeftMiddleware,
        FormGuardMiddleware,  # reads forms through the body guards
        InFlightLimitMiddleware,
    ]


def test_a_guards_refusal_gets_the_id_and_the_envelope_of_the_outer_layers() -> None:
    settings = ClipSettings(api_keys=["k" * 20], max_request_bytes=1024)
    app = wrap(reading_app(), middleware_stack(settings, {}, {}))
    scope = scope_for("/evaluator/v1/score", [(b"x-request-id", b"id-7")])
    status, headers, body = call(app, scope)
    assert status == 401 and headers[b"x-request-id"] == b"id-7"
    assert body["error"]["request_id"] == "id-7"
    scope["headers"] += [(b"authorization", b"Bearer " + b"k" * 20)]
    status, headers, body = call(app, scope, chunks(b"x" * 1025))
    assert status == 413 and body["error"]["request_id"] == "id-7"
