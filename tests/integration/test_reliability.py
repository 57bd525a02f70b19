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
from pathlib import Path

import httpx
import pytest

from tests.images import b64, jpeg_bytes
from tests.integration.server import (
    GRACEFUL_SHUTDOWN_S,
    ServerProcess,
    model_folder,
    run_load_test,
)

pytestmark = pytest.mark.integration

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"


@pytest.fixture(scope="module")
def small_server(
    bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """ViT-B-32 only, with an in-flight limit small enough to exceed with a few requests."""
    env = {"CLIP_MODELS": "ViT-B-32", "CLIP_MAX_IN_FLIGHT": "2", "CLIP_RETRY_AFTER_S": "3"}
    process = ServerProcess(bentoml_home, tmp_path_factory.mktemp("small") / "serve.log", env)
    process.start()
    yield process
    process.stop()


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


def _expect_refusal(home: Path, tmp_path: Path, needle: str) -> None:
    """The service never reports ready, and its log names the problem."""
    server = ServerProcess(home, tmp_path / "serve.log", {"CLIP_MODELS": "ViT-B-32"})
    try:
        with pytest.raises(RuntimeError) as refused:  # start() returns only on a /readyz 200
            server.start(timeout_s=60)
    finally:
        server.stop()
    assert needle in str(refused.value) or needle in server.log_path.read_text(errors="replace")


def test_missing_model_entry_refuses_to_start(tmp_path: Path) -> None:
    _expect_refusal(
        tmp_path / "empty-home",
        tmp_path,
        "Save it with `python scripts/save_models.py --models ViT-B-32`",
    )


def test_corrupt_weights_refuse_to_start(bentoml_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    source = model_folder(bentoml_home, "clip-vit-b-32")
    target = home / "models" / "clip-vit-b-32" / source.name
    shutil.copytree(source, target)
    (target.parent / "latest").write_text(source.name)
    weights = target / "open_clip_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data: only the sha256 can tell
    weights.write_bytes(bytes(data))
    _expect_refusal(home, tmp_path, "does not match the recorded")


def test_locust_smoke_run_passes(server: ServerProcess, tmp_path: Path) -> None:
    result = run_load_test(server.url, tmp_path, "smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    assert (tmp_path / "smoke.html").stat().st_size > 0
    stats = (tmp_path / "smoke.json").read_text()  # Locust's final statistics
    assert '"single"' in stats and '"batch"' in stats
