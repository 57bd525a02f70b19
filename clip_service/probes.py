"""The front end's probes: BentoML's ``/readyz`` (``__is_ready__``) and ``/evaluator/health``.
Both answer within about a second at any point of start-up, whether the model worker is up,
loading or gone, so a Kubernetes probe never times out on them."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx

from clip_runtime.preprocessing import Preprocessing
from clip_service.health import WorkerModels, health_result
from clip_service.schemas import HealthResult

# How long a probe (/readyz, /evaluator/health) waits for the model worker: probes must answer
# within a Kubernetes probe's timeout, whether the model worker is up, loading or gone.
MODEL_WORKER_PROBE_TIMEOUT_S = 1.0
# What a call to the model worker raises when it is restarting, killed or not listening.
MODEL_WORKER_UNREACHABLE = (aiohttp.ClientError, httpx.HTTPError, ConnectionError)


class FrontEndProbes:
    """Mixin of the front end's service class: its readiness and health probes. It uses the
    front end's model worker client (``model_worker``), preprocessing and ``worker_models``."""

    if TYPE_CHECKING:
        model_worker: Any  # bentoml.depends(Scorer): the model worker's client
        preprocessing: Preprocessing
        worker_models: WorkerModels

    async def _scorer_ready(self) -> bool:
        """Whether the model worker says it is ready, asked with a short bound: while it loads,
        its socket accepts connections that nobody answers yet."""
        try:
            return await asyncio.wait_for(
                self.model_worker.to_async.is_ready(MODEL_WORKER_PROBE_TIMEOUT_S),
                MODEL_WORKER_PROBE_TIMEOUT_S,
            )
        except (TimeoutError, *MODEL_WORKER_UNREACHABLE):
            return False

    async def __is_ready__(self) -> bool:
        """BentoML's `/readyz` (503 until True): preprocessing built and the model worker
        ready, answered within about a second at any point of start-up."""
        return self.preprocessing.ready and await self._scorer_ready()

    async def health(self) -> tuple[HealthResult, bool]:
        """Every served model's status within about one probe timeout: readiness from the model
        worker's readiness probe (answered ahead of its batch queue), descriptions from what the
        front end keeps (asked for once per worker start, never waited on for long)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        worker_ready = self.preprocessing.ready and await self._scorer_ready()
        if worker_ready:
            left_s = MODEL_WORKER_PROBE_TIMEOUT_S - (loop.time() - started)
            described = await self.worker_models.known(left_s)
        else:
            self.worker_models.forget()  # gone or restarting: describe the next one anew
            described = {}
        settings = self.preprocessing.settings
        entries = {name: self.preprocessing.entries[name] for name in settings.models}
        return health_result(entries, settings.default_model, worker_ready, described)
