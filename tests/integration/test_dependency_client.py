"""The front end's client to the model worker under real `bentoml serve`.

Below the limits no request may fail because of how the front end talks to the model worker
(BentoML 1.4.40 recycled that client's session every 100 calls under in-flight calls, see
``clip_service/bentoml_adapter.py``), and an unreachable model worker is a 503
``model_not_ready`` with Retry-After, not a 500, with ``/readyz`` answering 503.

On the shared server (CLIP_RETRY_AFTER_S=2): the socket test puts the worker's socket back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from clip_testkit.routes import BATCH, EMBED_IMAGE, EMBED_TEXT, HEALTH, RANK, SINGLE, UPLOAD
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ServerProcess

pytestmark = pytest.mark.integration

REQUESTS = 200  # two session refreshes of BentoML's client (one per 100 model calls)
CLIENTS = 8


def test_every_request_below_the_limits_is_answered_200(server: ServerProcess) -> None:
    images = [b64(jpeg_bytes(seed, 64, 64)) for seed in range(4)]

    async def run() -> list[tuple[int, str]]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(REQUESTS):
            queue.put_nowait(index)
        outcomes: list[tuple[int, str]] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def worker() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    body = {"image": images[index % 4], "text": f"caption {index % 7}"}
                    response = await client.post(SINGLE, json=body)
                    code = "" if response.is_success else response.json()["error"]["code"]
                    outcomes.append((response.status_code, code))

            await asyncio.gather(*(worker() for _ in range(CLIENTS)))
        return outcomes

    outcomes = asyncio.run(run())
    assert len(outcomes) == REQUESTS
    not_ok = Counter(f"{status} {code}" for status, code in outcomes if status != 200)
    assert not not_ok, f"{sum(not_ok.values())} of {REQUESTS} failed: {dict(not_ok)}"


def _scorer_socket(server: ServerProcess) -> Path:
    """The Unix socket the model worker listens on (BentoML's default on Linux)."""
    for worker in server.workers():
        if "clip-scorer" in " ".join(worker.cmdline()):
            paths = {c.laddr for c in worker.net_connections(kind="unix") if c.laddr}
            sockets = [Path(p) for p in paths if p.endswith(".sock")]
            if sockets:
                return sockets[0]
    raise RuntimeError("no clip-scorer worker listening on a Unix socket")


def test_an_unreachable_model_worker_is_503_model_not_ready_and_not_ready(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The worker's socket is moved away: new connections are refused, as when nothing listens.

    Kept-alive connections to the worker would still work, so the check waits for them to
    expire first (uvicorn closes idle ones after 5 s)."""
    socket_path = _scorer_socket(server)
    hidden = socket_path.with_name("hidden-" + socket_path.name)
    time.sleep(6)
    socket_path.rename(hidden)
    image = b64(jpeg_bytes(1, 64, 64))
    body = {"image": image, "text": "a cat"}
    requests = {  # every endpoint that calls the model worker, one request each
        SINGLE: {"json": body},
        UPLOAD: {"files": {"image": ("cat.jpg", jpeg_bytes(1, 64, 64))}, "data": {"text": "a"}},
        BATCH: {"json": {"items": [body, body]}},
        RANK: {"json": {"image": image, "texts": ["a cat", "a dog"]}},
        EMBED_IMAGE: {"json": {"images": [image]}},
        EMBED_TEXT: {"json": {"texts": ["a cat"]}},
    }
    try:
        answers = {
            path: httpx.post(f"{server.url}{path}", timeout=60, **request)
            for path, request in requests.items()
        }
        # BentoML 1.4.40 alone never answered this probe (see the adapter's is_ready).
        readyz = httpx.get(f"{server.url}/readyz", timeout=30)
        health = httpx.get(f"{server.url}{HEALTH}", timeout=30)
    finally:
        hidden.rename(socket_path)
    for path, response in answers.items():
        assert response.status_code == 503, (path, response.text)
        assert response.json()["error"]["code"] == "model_not_ready", path
        assert response.headers["retry-after"] == "2", path
        assert response.elapsed.total_seconds() < 10, path  # refused, not left hanging
    assert readyz.status_code == 503 and readyz.elapsed.total_seconds() < 10
    assert health.status_code == 503 and "status" in health.json(), health.text
    assert health.json()["status"] == "unavailable", health.text
    assert not any(model["ready"] for model in health.json()["models"])
    # Reachable again: served again.
    again = httpx.post(f"{server.url}{SINGLE}", json=body, timeout=60)
    assert again.status_code == 200, again.text
