"""One error envelope for every error answer under the API prefix: ours, and those the framework
raises itself (validation, overload, crashes, a 404).

Error envelope: ``{"error": {"code": str, "message": str, "request_id": str, "detail"?: list}}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.http_errors import CLIENT_CLOSED_REQUEST, error_body
from clip_service.middleware.answers import header, request_id_of
from clip_service.schemas import MAX_NAMED_UNKNOWN_FIELDS, MORE_UNKNOWN_FIELDS, echoed

GENERIC_5XX = "internal error; quote the request_id when reporting it"
# What a validation error item keeps: not pydantic's docs URL (it names the version) nor the input.
_DETAIL_KEYS = ("type", "loc", "msg")
# How many problems an error answer lists (message and detail); the rest are counted.
MAX_LISTED_PROBLEMS = 2 * MAX_NAMED_UNKNOWN_FIELDS
# Content types BentoML parses as a form; a JSON API then sees none of the fields that were sent.
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")
SEND_JSON = "send JSON with `Content-Type: application/json`"
# Codes for errors the framework raises before or around our handlers, by HTTP status.
FRAMEWORK_CODES: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "invalid_request",
    HTTPStatus.UNAUTHORIZED: "unauthorized",
    HTTPStatus.FORBIDDEN: "forbidden",
    HTTPStatus.NOT_FOUND: "not_found",
    HTTPStatus.METHOD_NOT_ALLOWED: "method_not_allowed",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    HTTPStatus.UNPROCESSABLE_ENTITY: "invalid_request",
    HTTPStatus.TOO_MANY_REQUESTS: "overloaded",
    HTTPStatus.SERVICE_UNAVAILABLE: "service_unavailable",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout",
    CLIENT_CLOSED_REQUEST: "client_closed_request",
}


def _public_item(item: dict[str, Any]) -> dict[str, Any]:
    public = {key: item[key] for key in _DETAIL_KEYS if key in item}
    if isinstance(public.get("loc"), list | tuple):
        public["loc"] = [echoed(part) for part in public["loc"]]
    return public


def _public_detail(detail: list[Any]) -> list[Any]:
    return [
        _public_item(item) if isinstance(item, dict) else item
        for item in detail[:MAX_LISTED_PROBLEMS]
    ]


def input_fields_by_route(apis: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """Route -> the field names its JSON body may have, from BentoML APIs' ``input_spec``."""
    return {api.route: tuple(api.input_spec.model_fields) for api in apis}


def _location(loc: Iterable[Any]) -> str:
    text = ""
    for part in map(echoed, loc):
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "body"


def validation_message(
    detail: list[Any], fields: tuple[str, ...] = (), form_content_type: str | None = None
) -> str:
    """What is wrong, by field (pydantic's items ``{type, loc, msg}``), and how to fix it:
    ``text: field required; unknown field 'caption' (fields: image, text, ...)``."""
    if form_content_type is not None:
        curl = " (curl -d's default)" if form_content_type.endswith("urlencoded") else ""
        return (
            f"{SEND_JSON}: this body was sent as {form_content_type}{curl}, so none of its "
            "fields were read"
        )
    problems = []
    for item in detail[:MAX_LISTED_PROBLEMS]:
        if not isinstance(item, dict):
            continue
        where, kind, msg = _location(item.get("loc", ())), item.get("type"), item.get("msg", "")
        if kind == "missing":
            problems.append(f"{where}: field required")
        elif kind == "extra_forbidden":
            known = f" (fields: {', '.join(fields)})" if fields and "." not in where else ""
            problems.append(f"unknown field {where!r}{known}")
        elif kind == MORE_UNKNOWN_FIELDS:
            problems.append(f"{msg} in {where}" if item.get("loc") else msg)
        elif kind == "json_invalid":
            problems.append(f"the body is not valid JSON ({msg}); {SEND_JSON}")
        else:
            problems.append(f"{where}: {msg}")
    if len(detail) > MAX_LISTED_PROBLEMS:
        problems.append(f"and {len(detail) - MAX_LISTED_PROBLEMS} more problems")
    return "; ".join(problems) or "invalid request"


def rewrite_error(
    status: int,
    body: bytes,
    request_id: str | None,
    fields: tuple[str, ...] = (),
    form_content_type: str | None = None,
) -> bytes:
    """Our envelope for any JSON (or empty) error body; ours get the request id added. A
    validation error's message says what is wrong by field (``fields``: the route's names);
    ``form_content_type``: a JSON route's body came as a form."""
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    if isinstance(parsed, list) and parsed and isinstance(parsed[0], dict):
        parsed = parsed[0]  # BentoML wraps some error details in a 1-tuple
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and "code" in error:
        if request_id is not None:
            error.setdefault("request_id", request_id)
        if status >= 500 and status != HTTPStatus.SERVICE_UNAVAILABLE:
            error["message"] = GENERIC_5XX  # a 503 says why (overload, not ready), no internals
        return json.dumps({"error": error}).encode()
    code = FRAMEWORK_CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
    message = error if isinstance(error, str) else HTTPStatus(status).phrase
    if status >= 500 and status != HTTPStatus.SERVICE_UNAVAILABLE:
        message = GENERIC_5XX
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    if status == HTTPStatus.BAD_REQUEST and (isinstance(detail, list) or form_content_type):
        message = validation_message(detail or [], fields, form_content_type)
    envelope = error_body(code, message, request_id)
    if isinstance(detail, list):
        envelope["error"]["detail"] = _public_detail(detail)
    return json.dumps(envelope).encode()


def form_content_type(scope: Scope, upload_routes: frozenset[str]) -> str | None:
    """The form media type a JSON route's body came as (BentoML then reads none of its fields),
    or None."""
    content_type = header(scope, b"content-type") or b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type in _FORM_TYPES and scope["path"] not in upload_routes:
        return media_type.decode("latin-1")
    return None


def enveloped_headers(start: Message, body: bytes, retry_after: bytes) -> list[tuple[bytes, bytes]]:
    """An error answer's headers for its rewritten ``body``."""
    headers = [
        (name, value)
        for name, value in start["headers"]
        if name.lower() not in (b"content-length", b"content-type")
    ]
    if start["status"] == HTTPStatus.SERVICE_UNAVAILABLE and not any(
        name.lower() == b"retry-after" for name, _ in headers
    ):  # every 503 (ours or the framework's) tells clients when to come back
        headers.append((b"retry-after", retry_after))
    return [
        *headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]


class ErrorEnvelopeMiddleware:
    """Every error answer (status >= 400) under ``prefix`` gets the envelope with the request
    id, a 5xx other than 503 a generic message, a 503 ``Retry-After``. Outside every guard that
    answers errors, so it sees them all; it holds an error answer until its body is complete.

    ``own_error_bodies``: paths whose error answers are their own document and stay as they are
    (health's 503 lists every model and why it is unavailable).
    ``input_fields``: route -> its fields (``input_fields_by_route``), named in messages.
    ``upload_routes``: routes that take a form (a form sent to any other is a mistake)."""

    def __init__(
        self,
        app: ASGIApp,
        prefix: str | tuple[str, ...] = "/evaluator/",
        own_error_bodies: frozenset[str] = frozenset(),
        retry_after_s: int = 1,
        input_fields: Mapping[str, tuple[str, ...]] | None = None,
        upload_routes: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.prefix = prefix
        self.own_error_bodies = own_error_bodies
        self.retry_after = str(retry_after_s).encode()
        self.input_fields = input_fields or {}
        self.upload_routes = upload_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not path.startswith(self.prefix)
            or path in self.own_error_bodies
        ):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # an error answer's start, until its body is known
        chunks: list[bytes] = []

        async def enveloping_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = rewrite_error(
                held["status"],
                b"".join(chunks),
                request_id_of(scope),
                self.input_fields.get(path, ()),
                form_content_type(scope, self.upload_routes),
            )
            await send({**held, "headers": enveloped_headers(held, body, self.retry_after)})
            await send({"type": "http.response.body", "body": body})
            held = None

        await self.app(scope, receive, enveloping_send)
