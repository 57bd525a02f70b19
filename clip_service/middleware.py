"""HTTP concerns that sit in front of every API: request ids, the request body limit, and one error
envelope for errors the framework raises itself (validation, overload, crashes) as well as ours.

Error envelope: ``{"error": {"code": str, "message": str, "request_id": str, "detail"?: list}}``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.errors import error_body

logger = logging.getLogger("clip_service.middleware")

REQUEST_ID_HEADER = "x-request-id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
GENERIC_5XX = "internal error; quote the request_id when reporting it"

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
}


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _SAFE_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _rewrite_error(status: int, body: bytes, request_id: str) -> bytes:
    """Our envelope for any JSON (or empty) error body; ours get the request id added."""
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
    envelope = error_body(code, message, request_id)
    if isinstance(parsed, dict) and isinstance(parsed.get("detail"), list):
        envelope["error"]["detail"] = parsed["detail"]
    return json.dumps(envelope).encode()


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
    return None


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant-time per key, and every key is compared, so timing says nothing of which."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token or b"", key)
    return matched and token is not None


class RequestGuardMiddleware:
    """Pure ASGI middleware (no body buffering on success paths): request id, optional bearer
    auth, body size limit, and the error envelope under ``error_prefix``."""

    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        api_keys: tuple[str, ...] = (),
        open_paths: tuple[str, ...] = (),
        error_prefix: str = "/evaluator/",
        retry_after_s: int = 1,
    ) -> None:
        self.app = app
        self.retry_after = str(retry_after_s).encode()
        self.max_request_bytes = max_request_bytes
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.open_paths = frozenset(path.rstrip("/") or "/" for path in open_paths)
        self.error_prefix = error_prefix

    def _needs_key(self, path: str) -> bool:
        if not self.api_keys:
            return False
        normalized = path.rstrip("/") or "/"
        protected = normalized.startswith(self.error_prefix.rstrip("/"))
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
            body = json.dumps(error_body(code, message, request_id)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), header, *extra_headers],
                }
            )
            await send({"type": "http.response.body", "body": body})

        if self._needs_key(scope["path"]) and not key_matches(_bearer_token(scope), self.api_keys):
            # Keys are never logged; only the fact of a refusal is.
            logger.info("401 for %s (request %s)", scope["path"], request_id)
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
        overflow = False
        replaced = False
        too_large = f"request body exceeds {self.max_request_bytes} bytes"

        async def limited_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    overflow = True
                    raise _BodyTooLarge
            return message

        rewrite = scope["path"].startswith(self.error_prefix)
        pending_start: Message | None = None
        chunks: list[bytes] = []

        async def guarded_send(message: Message) -> None:
            nonlocal pending_start, replaced
            if overflow:  # replace whatever the app answers to an over-long body with a 413
                if not replaced and message["type"] == "http.response.start":
                    await reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request_too_large", too_large)
                replaced = True
                return
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
                if rewrite and message["status"] >= 400:
                    pending_start = message  # hold it until the body is known
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and pending_start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _rewrite_error(pending_start["status"], b"".join(chunks), request_id)
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

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not replaced:  # the app let the error escape before it answered
                await reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request_too_large", too_large)


class _BodyTooLarge(Exception):
    pass
