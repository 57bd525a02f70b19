"""HTTP concerns that sit in front of every API: request ids, the request body limit, form checks,
auth, and one error envelope for errors the framework raises itself (validation, overload,
crashes) as well as ours.

Error envelope: ``{"error": {"code": str, "message": str, "request_id": str, "detail"?: list}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.errors import CLIENT_CLOSED_REQUEST, CURRENT_REQUEST_ID, error_body
from clip_service.multipart_guard import MultipartRefused, check_form, is_multipart
from clip_service.observability import escape_logged_client_values
from clip_service.schemas import MAX_NAMED_UNKNOWN_FIELDS, MORE_UNKNOWN_FIELDS, echoed

logger = logging.getLogger("clip_service.middleware")

REQUEST_ID_HEADER = "x-request-id"
# BentoML's own id header (its span id): overwritten with ours, so an answer shows one id.
BENTOML_REQUEST_ID_HEADER = b"x-bentoml-request-id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
GENERIC_5XX = "internal error; quote the request_id when reporting it"
# API documentation pages: open, or behind the API key with CLIP_AUTH_DOCS=protected.
DOC_PATHS = ("/", "/docs.json", "/schema.json", "/evaluator/docs", "/evaluator/demo")
# What a validation error item keeps: not pydantic's docs URL (it names the version) nor the input.
_DETAIL_KEYS = ("type", "loc", "msg")
# How many problems an error answer lists (message and detail); the rest are counted.
MAX_LISTED_PROBLEMS = 2 * MAX_NAMED_UNKNOWN_FIELDS
# Content types BentoML parses as a form; a JSON API then sees none of the fields that were sent.
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")
SEND_JSON = "send JSON with `Content-Type: application/json`"
# An upload route takes a form only: BentoML would download any other body's text as a URL.
SEND_FORM = "send the file as multipart/form-data (curl -F image=@photo.jpg -F text=...)"

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


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _SAFE_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


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


def _rewrite_error(
    status: int,
    body: bytes,
    request_id: str,
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


def _bearer_token(scope: Scope) -> bytes | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return None


def _authorization_count(scope: Scope) -> int:
    return sum(name == b"authorization" for name, _ in scope.get("headers", []))


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant-time per key, and every key is compared, so timing says nothing of which."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token or b"", key)
    return matched and token is not None


# BentoML logs every failed API call here, client mistakes included, at ERROR with a traceback
# whose exception text quotes the request body (``log_exception``, bentoml._internal).
BENTOML_API_ERROR_LOGGER = "bentoml._internal.server.http_app"


class ClientErrorLogFilter(logging.Filter):
    """Turns BentoML's ERROR-with-traceback for a client mistake (a validation error or a 4xx
    BentoML exception) into one WARNING line without traceback or payload."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        # The id the answer shows (ids are [A-Za-z0-9._:-] or a uuid: no % to format).
        request_id = CURRENT_REQUEST_ID.get()
        with_id = "" if request_id is None else f" (request {request_id})"
        exc = record.exc_info[1]
        status = _client_error_status(exc)
        if status is None:  # a server error keeps its traceback, and gets the id
            record.msg = f"{record.msg}{with_id}"
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        path, method = (*args, "?", "?")[:2]
        record.msg = "client error %s on %s [%s]: %s" + with_id
        record.args = (status, path, method, type(exc).__name__)
        level = logging.INFO if status == CLIENT_CLOSED_REQUEST else logging.WARNING
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info = record.exc_text = None
        return True


def _client_error_status(exc: BaseException | None) -> int | None:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ClientDisconnect):  # the client left mid-body: not a server error
        return CLIENT_CLOSED_REQUEST
    if isinstance(exc, _BodyRefused):  # too large or too slow: the guard answers it
        return exc.status
    if isinstance(exc, ValidationError):
        return int(HTTPStatus.BAD_REQUEST)
    if isinstance(exc, BentoMLException) and int(exc.error_code) < 500:
        return int(exc.error_code)
    return None


def quiet_client_error_logs() -> None:
    api_logger = logging.getLogger(BENTOML_API_ERROR_LOGGER)
    if not any(isinstance(f, ClientErrorLogFilter) for f in api_logger.filters):
        api_logger.addFilter(ClientErrorLogFilter())


class RequestGuardMiddleware:
    """Pure ASGI middleware (no body buffering on success paths, except forms, which are checked
    whole): request id, optional bearer auth, body size limit and deadline, form checks, and the
    error envelope under ``error_prefix`` (one path prefix, or a tuple of them).

    ``file_fields``: route -> form fields that must be file parts (``file_fields_by_route``).
    ``input_fields``: route -> its fields (``input_fields_by_route``), named in error messages.
    ``protect_docs``: with API keys, ``DOC_PATHS`` need a key too.
    ``body_deadline``: when a body must be complete (408 and the connection closed if not).
    ``own_error_bodies``: paths under ``error_prefix`` whose error answers are their own document
    and stay as they are (health's 503 lists every model and why it is unavailable)."""

    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        api_keys: tuple[str, ...] = (),
        open_paths: tuple[str, ...] = (),
        error_prefix: str | tuple[str, ...] = "/evaluator/",
        retry_after_s: int = 1,
        file_fields: dict[str, frozenset[str]] | None = None,
        input_fields: dict[str, tuple[str, ...]] | None = None,
        protect_docs: bool = False,
        body_deadline: BodyDeadline | None = None,
        own_error_bodies: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.own_error_bodies = own_error_bodies
        self.body_deadline = body_deadline  # None: bodies have no deadline of their own
        self.retry_after = str(retry_after_s).encode()
        self.max_request_bytes = max_request_bytes
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.open_paths = frozenset(path.rstrip("/") or "/" for path in open_paths)
        self.error_prefixes = (error_prefix,) if isinstance(error_prefix, str) else error_prefix
        self.file_fields = file_fields or {}
        self.input_fields = input_fields or {}
        self.protect_docs = protect_docs
        quiet_client_error_logs()
        escape_logged_client_values()

    def _needs_key(self, path: str) -> bool:
        if not self.api_keys:
            return False
        normalized = path.rstrip("/") or "/"
        if normalized in DOC_PATHS:
            return self.protect_docs
        protected = normalized.startswith(tuple(p.rstrip("/") for p in self.error_prefixes))
        return protected and normalized not in self.open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def reply(
            status: int, code: str, message: str, extra_headers: list[tuple[bytes, bytes]] = ()
        ) -> None:
            logger.log(
                logging.INFO if status == CLIENT_CLOSED_REQUEST else logging.WARNING,
                "%s %s on %s (request %s): %s",
                status,
                code,
                scope["path"],
                request_id,
                message,
            )
            body = json.dumps(error_body(code, message, request_id)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), header, *extra_headers],
                }
            )
            await send({"type": "http.response.body", "body": body})

        async def refuse(refused: _BodyRefused) -> None:
            # An unread body leaves the connection unusable: "connection: close" makes h11 end it.
            close = [(b"connection", b"close")] if refused.close else []
            await reply(refused.status, refused.code, refused.message, close)

        if self._needs_key(scope["path"]) and _authorization_count(scope) > 1:
            # Proxies and frameworks disagree on which of two headers counts: refuse both.
            await reply(
                HTTPStatus.BAD_REQUEST, "invalid_request", "send one Authorization header only"
            )
            return
        if self._needs_key(scope["path"]) and not key_matches(_bearer_token(scope), self.api_keys):
            # Keys are never logged; only the fact of a refusal is (in reply).
            await reply(
                HTTPStatus.UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required",
                extra_headers=[(b"www-authenticate", b'Bearer realm="clip"')],
            )
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_request_bytes:
            await reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "request_too_large",
                f"request body has {declared} bytes; at most {self.max_request_bytes} are accepted",
            )
            return

        received = 0
        body_complete = False
        refusal: _BodyRefused | None = None
        replaced = False
        started = asyncio.get_running_loop().time()

        async def limited_receive() -> Message:
            nonlocal received, body_complete, refusal
            deadline = self.body_deadline
            if body_complete:  # later receives wait for the disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline and deadline.at(started, received)):
                    message = await receive()
            except TimeoutError:
                refusal = _BodyRefused(
                    HTTPStatus.REQUEST_TIMEOUT,
                    "request_timeout",
                    f"request body too slow: {received} bytes in "
                    f"{asyncio.get_running_loop().time() - started:.0f} s",
                    close=True,
                )
                raise refusal from None
            if message["type"] != "http.request":
                body_complete = True  # the client left: whatever the app answers is a 499
                refusal = _BodyRefused(
                    CLIENT_CLOSED_REQUEST,
                    "client_closed_request",
                    f"the client closed the connection after {received} bytes of its body",
                )
                return message
            received += len(message.get("body", b""))
            body_complete = not message.get("more_body", False)
            if received > self.max_request_bytes:
                refusal = _BodyRefused(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    "request_too_large",
                    f"request body exceeds {self.max_request_bytes} bytes",
                )
                raise refusal
            return message

        path = scope["path"]
        rewrite = path.startswith(self.error_prefixes) and path not in self.own_error_bodies
        pending_start: Message | None = None
        chunks: list[bytes] = []

        async def guarded_send(message: Message) -> None:
            nonlocal pending_start, replaced
            if refusal is not None:  # replace whatever the app answers to a refused body
                if not replaced and message["type"] == "http.response.start":
                    await refuse(refusal)
                replaced = True
                return
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_request_id(message, header)}
                if rewrite and message["status"] >= 400:
                    pending_start = message  # hold it until the body is known
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and pending_start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _rewrite_error(
                    pending_start["status"],
                    b"".join(chunks),
                    request_id,
                    self.input_fields.get(scope["path"], ()),
                    form_content_type,
                )
                headers = [
                    (name, value)
                    for name, value in pending_start["headers"]
                    if name.lower() not in (b"content-length", b"content-type")
                ]
                if pending_start["status"] == HTTPStatus.SERVICE_UNAVAILABLE and not any(
                    name.lower() == b"retry-after" for name, _ in headers
                ):  # every 503 (ours or the framework's) tells clients when to come back
                    headers.append((b"retry-after", self.retry_after))
                headers += [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({**pending_start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                pending_start = None
                return
            await send(message)

        app_receive = limited_receive
        content_type = _header(scope, b"content-type") or b""
        media_type = content_type.split(b";", 1)[0].strip().lower()
        form_content_type = (
            media_type.decode("latin-1")
            if media_type in _FORM_TYPES and not self.file_fields.get(scope["path"])
            else None
        )
        upload = rewrite and bool(self.file_fields.get(path)) and scope["method"] == "POST"
        if upload and not is_multipart(content_type):  # other methods: the router's 405
            await reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", SEND_FORM)
            return
        if rewrite and is_multipart(content_type):
            try:
                body = await _read_body(limited_receive)
                if refusal is not None:  # the client left mid-body
                    raise refusal
                check_form(
                    content_type,
                    body,
                    self.file_fields.get(path, frozenset()),
                    self.input_fields.get(path),
                )
            except _BodyRefused as refused:
                await refuse(refused)
                return
            except MultipartRefused as refused:
                await reply(HTTPStatus.BAD_REQUEST, "invalid_request", str(refused))
                return
            app_receive = _replay(body, receive)

        token = CURRENT_REQUEST_ID.set(request_id)
        try:
            await self.app(scope, app_receive, guarded_send)
        except _BodyRefused as refused:
            if not replaced:  # the app let the error escape before it answered
                await refuse(refused)
        finally:
            CURRENT_REQUEST_ID.reset(token)


@dataclass(frozen=True)
class BodyDeadline:
    """When a request body must be complete: ``timeout_s`` after its headers, plus one second
    for every ``min_rate_bytes_s`` bytes received (Apache mod_reqtimeout's ``body=,MinRate=``):
    a large body at any usable rate goes through, a trickle is cut after about ``timeout_s``."""

    timeout_s: float
    min_rate_bytes_s: int

    def at(self, started: float, received: int) -> float:
        """The loop time by which the next part of the body must arrive."""
        return started + self.timeout_s + received / self.min_rate_bytes_s


class _BodyRefused(Exception):
    """A body the guard stops reading: too large, or arriving too slowly."""

    def __init__(self, status: int, code: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


def _with_request_id(start: Message, header: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """A response's headers with ours added and BentoML's id header, if any, set to ours."""
    headers = [
        (name, header[1] if name.lower() == BENTOML_REQUEST_ID_HEADER else value)
        for name, value in start.get("headers", [])
    ]
    return [*headers, header]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app sees an empty body and the disconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the already-read body, then the client's later messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
