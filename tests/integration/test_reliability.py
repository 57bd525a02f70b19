"""Overload shedding, graceful SIGTERM drain, refusing a bad model store, and a Locust smoke run.

The long fault checks (2x-capacity overload, worker SIGKILL, soak) are ``python -m
load_tests.faults`` (``make reliability``); these are the fast ones.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clip_testkit.images import b64, jpeg_bytes
from clip_testkit.routes import BATCH, SINGLE
from clip_testkit.server import (
    GRACEFUL_SHUTDOWN_S,
    ServerProcess,
    launched_together,
    model_folder,
    run_load_test,
)

pytestmark = pytest.mark.integration


B32_ONLY = {"CLIP_MODELS": "ViT-B-32"}
MISSING_ENTRY = "Save it with `python scripts/save_models.py --models ViT-B-32`"
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


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits(
    small_server: ServerProcess,
) -> None:
    assert small_server.process is not None

    async def scenario() -> tuple[list[object], str]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=300) as client:
            in_flight = [
                asyncio.create_task(post_timed(client, _batch_body(2, f"drain {i}")))
                for i in range(2)
            ]
            await asyncio.sleep(0.3)  # both are being decoded or scored
            nonlocal sigterm_at
            sigterm_at = time.monotonic()
            small_server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)
            async with httpx.AsyncClient(base_url=small_server.url, timeout=10) as fresh:
                try:
                    late = await fresh.post(SINGLE, json={"image": "x", "text": "late"})
                    outcome = f"answered {late.status_code}"
                except httpx.TransportError as error:
                    outcome = f"refused: {type(error).__name__}"
            return await asyncio.gather(*in_flight, return_exceptions=True), outcome

    async def post_timed(client: httpx.AsyncClient, body: object) -> tuple[httpx.Response, float]:
        response = await client.post(BATCH, json=body)
        return response, time.monotonic()

    sigterm_at = 0.0
    started = time.monotonic()
    results, late_outcome = asyncio.run(scenario())
    for result in results:
        assert isinstance(result, tuple), result
        response, answered_at = result
        assert response.status_code == 200 and response.json()["succeeded"] == 2, response.text
        assert answered_at > sigterm_at  # it was in flight when the signal came: drained
    assert late_outcome.startswith("refused"), late_outcome
    returncode = small_server.process.wait(GRACEFUL_SHUTDOWN_S + 25)
    assert returncode == 0, small_server.log()
    assert time.monotonic() - started < GRACEFUL_SHUTDOWN_S + 25


def _expect_refusal(server: ServerProcess, needle: str) -> None:
    """The service logs the problem and does not report ready. Its log is polled, so the test
    ends as soon as the refusal is written (no waiting out a start-up timeout)."""
    logged = server.wait_for_log(needle, timeout_s=120)
    assert logged, server.log()
    assert not server.is_ready(), "a server with a bad model store reported ready"


def test_missing_model_entry_refuses_to_start(servers: ModuleServers) -> None:
    _expect_refusal(servers.missing_entry, MISSING_ENTRY)


def test_corrupt_weights_refuse_to_start(servers: ModuleServers) -> None:
    _expect_refusal(servers.corrupt_weights, CORRUPT_WEIGHTS)


def test_locust_smoke_run_passes(server: ServerProcess, tmp_path: Path) -> None:
    result = run_load_test(server.url, tmp_path, "smoke", run_time="6s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    assert (tmp_path / "smoke.html").stat().st_size > 0
    stats = (tmp_path / "smoke.json").read_text()  # Locust's final statistics
    assert '"single"' in stats and '"batch"' in stats
