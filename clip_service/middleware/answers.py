"""What the request guards share: reading headers, the request id a layer answers with, and
answering an error envelope of their own."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from starlette.types import Scope, Send

from clip_service.http_errors import CLIENT_CLOSED_REQUEST, error_body

logger = logging.getLogger("clip_service.middleware")

Headers = Sequence[tuple[bytes, bytes]]


def header(scope: Scope, wanted: bytes) -> bytes | None:
    """The first value of header ``wanted`` (lower case), or None."""
    for name, value in scope.get("headers", []):
        if name == wanted:
            return bytes(value)
    return None


def request_id_of(scope: Scope) -> str | None:
    """The id ``RequestIdMiddleware`` gave this request (None outside it)."""
    request_id: Any = scope.get("state", {}).get("request_id")
    return request_id if isinstance(request_id, str) else None


async def send_error(
    send: Send, scope: Scope, status: int, code: str, message: str, extra_headers: Headers = ()
) -> None:
    """Log one line and answer ``status`` with the error envelope; ``RequestIdMiddleware`` adds
    the id header on the way out."""
    request_id = request_id_of(scope)
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
    headers = [(b"content-type", b"application/json"), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
