"""Client values in log lines have their control characters escaped: a ``%0d%0a`` in a URL cannot
start a forged line, in our logs or in BentoML's access log."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest
from bentoml._internal.server.http.access import AccessLogMiddleware
from starlette.types import Message, Receive, Scope, Send

from clip_service.observability import escape_control_characters, escape_logged_client_values
from clip_testkit.guard import guarded

FORGED = "/evaluator/x\r\n2026-01-01 [ERROR] forged line\x1b[31m\u2028"


def http_scope(path: str) -> Scope:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode("latin-1", "replace"),
        "query_string": b"",
        "headers": [],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 3000),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
    }


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def serve(app: object, scope: Scope) -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    asyncio.run(app(scope, receive, send))  # type: ignore[operator]


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """What a handler like BentoML's (on the root and ``bentoml.access`` loggers) writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("bentoml.access")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    logging.getLogger("bentoml.access").propagate = False
    escape_logged_client_values()
    yield stream
    for lg, level, propagate in saved:
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate


def test_control_characters_are_written_as_escapes() -> None:
    assert (
        escape_control_characters("a\r\nb\x00\x1b\x85\u2028é") == "a\\r\\nb\\x00\\x1b\\x85\\u2028é"
    )


def test_the_guards_refusal_log_line_is_one_line(log_text: io.StringIO) -> None:
    guard = guarded(not_found, api_keys=["k" * 20])
    serve(guard, http_scope(FORGED))
    lines = log_text.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "/evaluator/x\\r\\n2026-01-01 [ERROR] forged line\\x1b[31m\\u2028" in lines[0]


def test_bentomls_access_log_line_is_one_line(log_text: io.StringIO) -> None:
    serve(AccessLogMiddleware(not_found), http_scope(FORGED))
    lines = log_text.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "path=/evaluator/x\\r\\n2026-01-01" in lines[0] and "status=404" in lines[0]
