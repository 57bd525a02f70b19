"""What the front end knows of the model worker, for ``/evaluator/health``.

Health must not ask the model worker anything that waits behind scoring: ``describe`` is a model
worker API and runs in the worker's one thread after the batch being scored, so under load a
health check that called it timed out and said 503 while ``/readyz`` said 200. Readiness comes
from the worker's readiness probe, which BentoML answers on its event loop, ahead of the batch
queue; the models' descriptions (device, dtype, scales) do not change while a worker runs, so
they are learned once per worker start and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from clip_runtime.model_entry import ModelEntry
from clip_service.schemas import HealthResult, ModelHealth, ModelStatus

logger = logging.getLogger("clip_service.health")


class WorkerModels:
    """The model worker's account of its models (``describe``), kept once learned.

    ``describe``: the call to the model worker; it may wait behind scoring, so ``known`` never
    waits for it longer than asked, and at most one call is in flight."""

    def __init__(self, describe: Callable[[], Awaitable[Iterable[Any]]]) -> None:
        self._describe = describe
        self._described: dict[str, ModelStatus] = {}
        self._learning: asyncio.Task[None] | None = None

    async def _learn(self) -> None:
        for status in await self._describe():
            parsed = ModelStatus.model_validate(status)
            self._described[parsed.name] = parsed

    def _start_learning(self) -> asyncio.Task[None]:
        if self._learning is None or self._learning.done():
            self._learning = asyncio.create_task(self._learn())
            self._learning.add_done_callback(_log_failure)
        return self._learning

    async def status(self, name: str) -> ModelStatus:
        """``name``'s description, asking the worker when not known yet (waits for it)."""
        if name not in self._described:
            await asyncio.shield(self._start_learning())
        return self._described[name]

    async def known(self, wait_s: float) -> dict[str, ModelStatus]:
        """The descriptions known now; when there are none, they are asked for in the
        background and waited for at most ``wait_s``."""
        if not self._described:
            learning = self._start_learning()
            # Slow or failed (the task logs a failure): report what is known.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(learning), max(wait_s, 0.0))
        return dict(self._described)

    def forget(self) -> None:
        """The worker is gone or restarting: a new one is described anew."""
        self._described.clear()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.info("the model worker's description failed: %r", task.exception())


def health_result(
    entries: dict[str, ModelEntry],
    default_model: str,
    worker_ready: bool,
    described: dict[str, ModelStatus],
) -> tuple[HealthResult, bool]:
    """Every served model's health: ready when the worker is (its engine warms every model
    before it says ready), with device and dtype once the worker has described them."""
    models = []
    for name, entry in entries.items():
        status = described.get(name)
        models.append(
            ModelHealth(
                name=name,
                architecture=entry.architecture,
                pretrained=entry.pretrained,
                weights=entry.weights,
                untrained=entry.untrained,
                family=entry.family,
                device=status.device if status else None,
                dtype=status.dtype if status else None,
                runtime=status.runtime if status else None,
                ready=worker_ready and (status is None or status.ready),
            )
        )
    ready = worker_ready and all(model.ready for model in models)
    result = HealthResult(
        status="ok" if ready else "unavailable", default_model=default_model, models=models
    )
    return result, ready
