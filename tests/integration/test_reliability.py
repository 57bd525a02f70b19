"""Overload shedding, graceful SIGTERM drain, refusing a bad model store, and a Locust smoke run.

The long fault checks (2x-capacity overload, worker SIGKILL, soak) are ``python -m
load_tests.faults`` (``make reliability``); these are the fast ones.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clip_testkit.routes import BATCH, SINGLE
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import (
    GRACEFUL_SHUTDOWN_S,
    ServerProcess,
    launched_together,
    model_folder,
    run_load_test,
)

pytestmark = pytest.mark.integration


B32_ONLY = {"CLIP_MODELS": "ViT-B-32"}
MISSING_ENTRY = "Save it with `python -m scripts.save_models --models ViT-B-32`"
CORRUPT_WEIGHTS = "does not match the recorded"


@dataclass
class ModuleServers:
    small: ServerProcess
    missing_entry: ServerProcess  # an empty model store
    corrupt_weights: ServerProcess  # one flipped byte in the weights

    def all(self) -> list[ServerProcess]:
        return [self.small, self.missing_entry, self.corrupt_weights]


def corrupt_store(bentoml_home: Path, home: Path) -> Path:
    """A store whose ViT-B-32 weights differ by one byte from what its sha256 records."""
    source = model_folder(bentoml_home, "clip-vit-b-32")
    target = home / "models" / "clip-vit-b-32" / source.name
    shutil.copytree(source, target)
    (target.parent / "latest").write_text(source.name)
    weights = target / "open_clip_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # in the tensor data: only the sha256 can tell
    weights.write_bytes(bytes(data))
    return home


@pytest.fixture(scope="module")
def servers(
    bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleServers]:
    """This module's own servers, launched together so that their start-ups overlap. The
    SIGTERM test, the last to use ``small``, stops it."""
    folder = tmp_path_factory.mktemp("reliability")
    small_env = {**B32_ONLY, "CLIP_MAX_IN_FLIGHT": "2", "CLIP_RETRY_AFTER_S": "3"}
    launched = ModuleServers(
        small=ServerProcess(bentoml_home, folder / "small.log", small_env),
        missing_entry=ServerProcess(folder / "empty-home", folder / "missing.log", B32_ONLY),
        corrupt_weights=ServerProcess(
            corrupt_store(bentoml_home, folder / "corrupt-home"), folder / "corrupt.log", B32_ONLY
        ),
    )
    with launched_together(launched.all()):
        yield launched


@pytest.fixture(scope="module")
def small_server(servers: ModuleServers) -> ServerProcess:
    """ViT-B-32 with an in-flight limit small enough to exceed with a few requests."""
    return servers.small.wait_ready()


def _batch_body(pairs: int, tag: str) -> dict[str, object]:
    image = b64(jpeg_bytes(3, 320, 240))
    return {"items": [{"image": image, "text": f"{tag} {i}"} for i in range(pairs)]}


def _expect_refusal(server: ServerProcess, needle: str) -> None:
    """The service logs the problem and does not report ready. Its log is polled, so the test
    ends as soon as the refusal is written (no waiting out a start-up timeout). These run first
    in the module, while ``small`` starts."""
    logged = server.wait_for_log(needle, timeout_s=120)
    assert logged, server.log()
    assert not server.is_ready(), "a server with a bad model store reported ready"
    server.stop()  # circus restarts a refused worker at once: a crash loop that eats a core


def test_missing_model_entry_refuses_to_start(servers: ModuleServers) -> None:
    _expect_refusal(servers.missing_entry, MISSING_ENTRY)


def test_corrupt_weights_refuse_to_start(servers: ModuleServers) -> None:
    _expect_refusal(servers.corrupt_weights, CORRUPT_WEIGHTS)


def test_beyond_the_in_flight_limit_requests_are_shed_with_retry_after(
    small_server: ServerProcess,
) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=300) as client:
            return await asyncio.gather(
                *(client.post(BATCH, json=_batch_body(8, f"burst {i}")) for i in range(8))
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    shed = [r for r in responses if r.status_code == 503]
    assert len(shed) >= 8 - 2 - 2  # at most 2 in flight; a couple may start after others end
    for response in shed:
        error = response.json()["error"]
        assert error["code"] == "overloaded" and "limit 2" in error["message"]
        assert error["request_id"] == response.headers["x-request-id"]
        assert response.headers["retry-after"] == "3"
        assert response.elapsed.total_seconds() < 10  # refused, not queued (generous bound)
    ok = [r for r in responses if r.status_code == 200]
    assert all(r.json()["succeeded"] == 8 for r in ok)
    # Health and probes are never shed.
    assert httpx.get(f"{small_server.url}/readyz", timeout=30).status_code == 200


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _start_request(url: str, body: bytes) -> Connection:
    """A batch request whose headers the service has taken up: it answered ``Expect:
    100-continue``, which uvicorn does on the app's first read of the body. The body is not sent
    yet, so the request stays in flight for as long as the test wants."""
    address = httpx.URL(url)
    host = address.host
    reader, writer = await asyncio.open_connection(host, address.port)
    writer.write(
        f"POST {BATCH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert interim.startswith(b"HTTP/1.1 100"), interim
    return reader, writer


async def _finish_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
) -> tuple[int, dict[str, object]]:
    writer.write(body)
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)).decode()
    lines = head.split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    payload = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    return int(lines[0].split()[1]), json.loads(payload)


def test_sigterm_drains_in_flight_requests_serves_no_new_ones_and_exits(
    small_server: ServerProcess,
) -> None:
    """Two requests are in the service when SIGTERM comes (their bodies still to be sent, so
    they cannot finish before it); a request sent after it is not served; both are then
    completed and answered, through the model worker on a new connection to it (the worker's
    socket outlives the drain: ``install_cleanup_after_workers``), and the server exits 0.

    The late request is not refused outright: the arbiter holds the listening socket until its
    workers exit, so the kernel queues the connection and no worker accepts it; it ends in a
    timeout (or a refusal, once the socket is closed)."""
    assert small_server.process is not None
    bodies = [json.dumps(_batch_body(2, f"drain {i}")).encode() for i in range(2)]

    async def scenario() -> tuple[list[tuple[int, dict[str, object]]], str]:
        started = [await _start_request(small_server.url, body) for body in bodies]
        small_server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.5)
        async with httpx.AsyncClient(base_url=small_server.url, timeout=2) as fresh:
            try:
                late = await fresh.post(SINGLE, json={"image": "x", "text": "late"})
                outcome = f"answered {late.status_code}"
            except (httpx.ConnectError, httpx.TimeoutException) as error:
                outcome = f"not served: {type(error).__name__}"
        answers = await asyncio.gather(
            *(_finish_request(r, w, body) for (r, w), body in zip(started, bodies, strict=True))
        )
        return answers, outcome

    started_at = time.monotonic()
    answers, late_outcome = asyncio.run(scenario())
    for status, payload in answers:
        assert status == 200 and payload["succeeded"] == 2, payload
    assert late_outcome.startswith("not served"), late_outcome
    returncode = small_server.process.wait(GRACEFUL_SHUTDOWN_S + 25)
    assert returncode == 0, small_server.log()
    assert time.monotonic() - started_at < GRACEFUL_SHUTDOWN_S + 25


def test_locust_smoke_run_passes(server: ServerProcess, tmp_path: Path) -> None:
    result = run_load_test(server.url, tmp_path, "smoke", run_time="6s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    assert (tmp_path / "smoke.html").stat().st_size > 0
    stats = (tmp_path / "smoke.json").read_text()  # Locust's final statistics
    assert '"single"' in stats and '"batch"' in stats
