"""The model worker's BentoML service (`clip-scorer`), put together from the settings and the
model store: ``ModelWorker`` (``clip_service.model_worker``) with a store reference and one
batchable API per served model. Importing this module reads the settings and checks the store
(a served model that is not saved raises here, naming the fix); ``clip_service.evaluator``
imports it for the front end's dependency and ``service.py`` exports ``Scorer``.

``bentoml.service`` is called at module level on purpose: BentoML 1.4.40 finds a service again
(``Service.import_string``, used to start its worker processes) among the module-level variables
of the module that created it."""

from __future__ import annotations

from collections.abc import Callable

import bentoml

from clip_runtime import Job, JobOutcome, get_settings
from clip_service.bentoml_adapter import accelerator_resources, gpu_count
from clip_service.model_worker import ModelWorker
from clip_service.store import add_store_references, batch_api_name

settings = get_settings()


def _batch_api(model: str) -> Callable[[ModelWorker, list[Job]], list[JobOutcome]]:
    def score(self: ModelWorker, jobs: list[Job]) -> list[JobOutcome]:
        """Jobs of one model (internal, batched)."""
        return self.run_batch(model, jobs)

    score.__name__ = score.__qualname__ = batch_api_name(model)  # BentoML names APIs by this
    return score


add_store_references(ModelWorker, settings)
for _model in settings.models:
    setattr(
        ModelWorker,
        batch_api_name(_model),
        bentoml.api(
            batchable=True,
            max_batch_size=settings.batch_size_for(_model),
            max_latency_ms=settings.latency_ms_for(_model),
        )(_batch_api(_model)),
    )

Scorer = bentoml.service(
    name="clip-scorer",
    workers=1,  # one process owns the accelerator; batches are what use it well
    resources=accelerator_resources(settings.device, gpu_count()),
    traffic={"timeout": 600},
)(ModelWorker)
