"""The request guard's body deadline: a trickled body is cut with 408 and a closed connection; a
body arriving at a usable rate, and the wait for a disconnect after it, are not."""

from __future__ import annotations

import asyncio
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.middleware.body import BodyDeadline
from clip_testkit.guard import guarded


async def echo_length(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"bytes": len(body)})


def guarded_echo(deadline: BodyDeadline) -> ASGIApp:
    app = Starlette(routes=[Route("/evaluator/echo", echo_length, methods=["POST"])])
    return guarded(
        app,
        max_request_bytes=10_000_000,
        body_timeout_s=deadline.timeout_s,
        body_min_rate_bytes_s=deadline.min_rate_bytes_s,
    )


async def post(
    guard: ASGIApp, chunks: list[bytes], gap_s: float
) -> tuple[int, dict[bytes, bytes], dict, float]:
    """POST ``chunks`` ``gap_s`` apart; the status, headers, JSON body and seconds taken."""
    pending = list(chunks)
    sent: list[Message] = []

    async def receive() -> Message:
        if not pending:
            await asyncio.sleep(3600)  # a client that stays connected and silent
        await asyncio.sleep(gap_s)
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/evaluator/echo",
        "raw_path": b"/evaluator/echo",
        "query_string": b"",
        "headers": [(b"content-type", b"application/octet-stream")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 3000),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
    }
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(guard(scope, receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body), loop.time() - started


def test_trickled_body_gets_408_and_the_connection_is_closed() -> None:
    # 1 byte every 0.1 s against 0.5 s + 1 s per 1,000 bytes: cut after about 0.5 s.
    guard = guarded_echo(BodyDeadline(timeout_s=0.5, min_rate_bytes_s=1000))
    status, headers, body, took_s = asyncio.run(post(guard, [b"x"] * 100, gap_s=0.1))
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert "request body too slow" in body["error"]["message"]
    assert headers[b"connection"] == b"close"
    assert 0.4 < took_s < 1.5


def test_body_at_the_minimum_rate_keeps_extending_its_deadline() -> None:
    # 2,000 bytes every 0.2 s (10 kB/s) for 2 s, far past the 0.5 s base: each chunk earns 2 s.
    guard = guarded_echo(BodyDeadline(timeout_s=0.5, min_rate_bytes_s=1000))
    status, headers, body, took_s = asyncio.run(post(guard, [b"x" * 2000] * 10, gap_s=0.2))
    assert (status, body) == (200, {"bytes": 20_000})
    assert b"connection" not in headers
    assert took_s > 1.5


def test_a_deadline_does_not_apply_after_the_body_is_complete() -> None:
    """After the body the app may wait on receive for the disconnect: that wait is not cut."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        try:
            seen.append(await asyncio.wait_for(receive(), 0.6))
        except TimeoutError:
            seen.append({"type": "still connected"})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = guarded(app, body_timeout_s=0.2, body_min_rate_bytes_s=1000)
    status, _, _, _ = asyncio.run(post(guard, [b"done"], gap_s=0))
    assert status == 200
    assert [m["type"] for m in seen] == ["http.request", "still connected"]
