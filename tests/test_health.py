"""/evaluator/health reports from what the front end keeps: the model worker's readiness probe,
and descriptions learned once per worker start, never a call that waits behind scoring."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from clip_runtime.model_entry import ModelEntry
from clip_service.health import WorkerModels, health_result

ENTRY = ModelEntry(
    architecture="ViT-B-32",
    pretrained=None,
    weights="random-init",
    weights_sha256="0" * 64,
    preprocess_cfg={},
    preprocess_from=None,
)
DESCRIPTION = {
    "name": "ViT-B-32",
    "architecture": "ViT-B-32",
    "pretrained": None,
    "weights": "random-init",
    "untrained": True,
    "device": "cpu",
    "dtype": "float32",
    "runtime": "torch",
    "ready": True,
    "embed_dim": 512,
    "logit_scale": 100.0,
}


class SlowWorker:
    """A model worker whose ``describe`` waits ``delay_s`` (behind a batch being scored)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.calls = delay_s, 0

    async def describe(self) -> list[dict[str, Any]]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return [DESCRIPTION]


def test_health_under_load_answers_ready_within_its_bound() -> None:
    """describe queued behind scoring (0.5 s here, over the 0.1 s wait) used to time out
    health's call: 503 while the worker was ready. Now: ready at once, device known once the
    description arrives."""
    worker = SlowWorker(delay_s=0.5)
    models = WorkerModels(worker.describe)

    async def probes() -> list[tuple[float, dict[str, Any]]]:
        answers = []
        for _ in range(3):
            started = time.monotonic()
            described = await models.known(wait_s=0.1)
            result, ready = health_result({"ViT-B-32": ENTRY}, "ViT-B-32", True, described)
            assert ready and result.status == "ok"
            answers.append((time.monotonic() - started, result.models[0].model_dump()))
            await asyncio.sleep(0.3)
        return answers

    answers = asyncio.run(probes())
    assert all(took_s < 0.3 for took_s, _ in answers)
    assert answers[0][1]["device"] is None and answers[0][1]["ready"]  # not described yet
    assert answers[-1][1]["device"] == "cpu"  # learned in the background
    assert worker.calls == 1  # one call in flight, then kept


def test_a_gone_worker_is_503_with_every_model_listed() -> None:
    result, ready = health_result({"ViT-B-32": ENTRY}, "ViT-B-32", False, {})
    assert not ready and result.status == "unavailable"
    (model,) = result.models
    assert (model.name, model.ready, model.device, model.untrained) == (
        "ViT-B-32",
        False,
        None,
        True,
    )


def test_a_failed_description_is_asked_again_and_forget_starts_over() -> None:
    calls = 0

    async def describe() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("worker restarting")
        return [DESCRIPTION]

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        models = WorkerModels(describe)
        first = await models.known(wait_s=0.5)
        second = await models.known(wait_s=0.5)
        models.forget()
        assert await models.known(wait_s=0.5)
        return first, second

    first, second = asyncio.run(run())
    assert first == {} and second["ViT-B-32"].device == "cpu"
    assert calls == 3


def test_rank_waits_for_the_description_it_needs() -> None:
    models = WorkerModels(SlowWorker(delay_s=0.2).describe)
    assert asyncio.run(models.status("ViT-B-32")).logit_scale == pytest.approx(100.0)
