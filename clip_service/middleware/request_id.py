"""Every request gets an id, and every answer shows it: in ``x-request-id`` and, for errors, in
the envelope (``scope["state"]["request_id"]`` for the layers inside, ``CURRENT_REQUEST_ID``
for log lines)."""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.http_errors import CURRENT_REQUEST_ID
from clip_service.middleware.client_logs import quiet_client_error_logs
from clip_service.observability import escape_logged_client_values

REQUEST_ID_HEADER = "x-request-id"
# BentoML's own id header (its span id): overwritten with ours, so an answer shows one id.
BENTOML_REQUEST_ID_HEADER = b"x-bentoml-request-id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_for(scope: Scope) -> str:
    """The client's ``x-request-id`` when it is safe to echo and log, else a new one."""
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _SAFE_REQUEST_ID.match(candidate):
                return str(candidate)
    return uuid.uuid4().hex


def with_request_id(start: Message, request_id: str) -> list[tuple[bytes, bytes]]:
    """A response's headers with ours added and BentoML's id header, if any, set to ours."""
    ours = request_id.encode()
    headers = [
        (name, ours if name.lower() == BENTOML_REQUEST_ID_HEADER else value)
        for name, value in start.get("headers", [])
    ]
    return [*headers, (REQUEST_ID_HEADER.encode(), ours)]


class RequestIdMiddleware:
    """Outside the other guards, so their refusals carry the id too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Built once per HTTP worker process, before any request: the log filters that keep
        # client values and client mistakes out of raw log lines go in with the ids they quote.
        quiet_client_error_logs()
        escape_logged_client_values()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": with_request_id(message, request_id)}
            await send(message)

        token = CURRENT_REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            CURRENT_REQUEST_ID.reset(token)
