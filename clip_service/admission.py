"""Load shedding: beyond the configured in-flight and queue limits, answer 503 at once.

Unbounded queues turn overload into ever-growing latency and memory for every request; refusing
the excess quickly (with ``Retry-After``) keeps the accepted requests inside their latency budget
and tells clients to back off. Limits are per HTTP worker process.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from clip_runtime.errors import OverloadedError
from clip_service.http_errors import error_body


class PairQueue:
    """Counts image-text pairs waiting for a model batch; refuses beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.depth = 0

    def acquire(self, pairs: int) -> None:
        # No await between the check and the increment: atomic on the event loop.
        if self.depth + pairs > self.limit:
            raise OverloadedError(
                f"{self.depth} pairs are queued for scoring (limit {self.limit}); retry later"
            )
        self.depth += pairs

    def release(self, pairs: int) -> None:
        self.depth -= pairs


class InFlightLimitMiddleware:
    """Pure ASGI: at most ``limit`` scoring requests (POST under ``prefix``, a path prefix or a
    tuple of them) at once; the rest get 503 ``overloaded`` with ``Retry-After`` before their
    body is read or decoded."""

    def __init__(
        self, app: ASGIApp, limit: int, retry_after_s: int, prefix: str | tuple[str, ...]
    ) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = str(retry_after_s).encode()
        self.prefix = prefix
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            request_id = scope.get("state", {}).get("request_id")
            message = f"{self.in_flight} requests in flight (limit {self.limit}); retry later"
            body = json.dumps(error_body(OverloadedError.code, message, request_id)).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", self.retry_after),
            ]
            status = HTTPStatus.SERVICE_UNAVAILABLE
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
