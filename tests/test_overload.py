"""The shedding primitives alone (served behaviour: tests/integration/test_reliability.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from clip_runtime.errors import OverloadedError
from clip_service.admission import InFlightLimitMiddleware, PairQueue


def test_pair_queue_refuses_beyond_its_limit_and_frees_on_release() -> None:
    queue = PairQueue(limit=10)
    queue.acquire(8)
    with pytest.raises(OverloadedError, match="8 pairs are queued"):
        queue.acquire(3)
    queue.acquire(2)
    queue.release(8)
    queue.acquire(8)
    assert queue.depth == 10


def test_in_flight_limit_sheds_scoring_posts_only() -> None:
    release = asyncio.Event()

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = InFlightLimitMiddleware(slow_app, limit=2, retry_after_s=5, prefix="/evaluator/v1/")

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/evaluator/v1/x")) for _ in range(2)]
            await asyncio.sleep(0.05)
            shed = await client.post("/evaluator/v1/x")
            probe = asyncio.create_task(client.get("/evaluator/v1/x"))  # GETs are not limited
            await asyncio.sleep(0.05)
            release.set()
            return [*(await asyncio.gather(*held)), await probe], shed

    served, shed = asyncio.run(scenario())
    assert [r.status_code for r in served] == [200, 200, 200]
    assert shed.status_code == 503 and shed.headers["retry-after"] == "5"
    assert shed.json()["error"]["code"] == "overloaded"
    assert app.in_flight == 0
