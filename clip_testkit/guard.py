"""The front end's middleware stack around any ASGI app: the guards tested without a server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Scope

from clip_runtime.settings import ClipSettings
from clip_service.middleware import middleware_stack, wrap


def guarded(
    app: ASGIApp,
    file_fields: Mapping[str, frozenset[str]] | None = None,
    input_fields: Mapping[str, tuple[str, ...]] | None = None,
    own_error_bodies: frozenset[str] = frozenset(),
    **settings: Any,
) -> ASGIApp:
    """``app`` inside every middleware the front end adds, with ``ClipSettings(**settings)``."""
    layers = middleware_stack(
        ClipSettings(**settings), file_fields or {}, input_fields or {}, own_error_bodies
    )
    return wrap(app, layers)


# What ``call`` returns: status, headers, JSON body (or None).
Answer = tuple[int, dict[bytes, bytes], Any]


def call(app: ASGIApp, scope: Scope, messages: list[Message] | None = None) -> Answer:
    """Run ``app`` with ``messages`` from the client (default: an empty body); the one answer's
    status, headers and JSON (or None) body."""
    pending = list(messages or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[Message] = []

    async def receive() -> Message:
        if not pending:
            await asyncio.sleep(3600)
        return pending.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return starts[0]["status"], dict(starts[0]["headers"]), json.loads(body) if body else None
