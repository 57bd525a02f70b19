"""Requests whose body length is ambiguous are refused, and their connection closed.

A request with both ``Content-Length`` and ``Transfer-Encoding`` is read by h11 as chunked, while
a proxy in front may have used the length: the bytes after the body would then run here as a
second request nobody sent (request smuggling). RFC 9112 section 6.1: a server may refuse such a
request, and must close the connection after answering it. The ``connection: close`` header
makes h11 (and so uvicorn) close it once the answer is sent.
"""

from __future__ import annotations

import json
import logging
import uuid
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from clip_service.http_errors import error_body

logger = logging.getLogger("clip_service.framing")

AMBIGUOUS_LENGTH = "send either Content-Length or Transfer-Encoding, not both (RFC 9112 6.1)"


def has_ambiguous_length(scope: Scope) -> bool:
    names = {name.lower() for name, _ in scope.get("headers", [])}
    return b"content-length" in names and b"transfer-encoding" in names


class AmbiguousLengthMiddleware:
    """A 400 ``invalid_request`` with ``connection: close`` for a request carrying both
    ``Content-Length`` and ``Transfer-Encoding``; every other request passes untouched.

    Outside every other middleware (the auth check's 401 too would leave the connection open),
    so it gives the answer its own request id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_ambiguous_length(scope):
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        logger.warning(
            "400 invalid_request on %s (request %s): %s",
            scope["path"],
            request_id,
            AMBIGUOUS_LENGTH,
        )
        body = json.dumps(error_body("invalid_request", AMBIGUOUS_LENGTH, request_id)).encode()
        headers = [
            (b"x-request-id", request_id.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send(
            {"type": "http.response.start", "status": HTTPStatus.BAD_REQUEST, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})
