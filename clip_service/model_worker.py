"""The model worker's class (``ModelWorker``): holds the weights and runs one model batch at a
time through the engine. ``clip_service.scorer`` serves it as `clip-scorer`, with one batchable
API per served model, so BentoML's adaptive batching merges concurrent requests and the items of
batch requests into shared forward passes. (A batchable API called from inside its own service
skips the batcher, hence a service apart from the HTTP front end.) Importing this module reads no
settings and touches no model store: the class reads them when a worker starts."""

from __future__ import annotations

import logging

import bentoml

from clip_runtime import Job, JobOutcome, get_settings
from clip_service.bentoml_adapter import bound_graceful_shutdown
from clip_service.observability import BatchObservation, configure_logging, record_model_info
from clip_service.schemas import ModelStatus
from clip_service.shutdown import stop_after_siblings_on_sigterm
from clip_service.store import model_folders

logger = logging.getLogger("clip_service.model_worker")

# How much longer than the HTTP workers' bounded drain the model worker waits on a SIGTERM, so
# that it outlives the requests that were accepted before it.
DRAIN_MARGIN_S = 30


class ModelWorker:
    def __init__(self) -> None:
        # Imported here, not at module level: the HTTP front end's wiring imports this module
        # (for `bentoml.depends(Scorer)`) and never loads torch (docs/architecture-data-path.md).
        from clip_runtime.engine import ClipEngine

        settings = get_settings()
        configure_logging(settings.log_format)
        self.engine = ClipEngine(settings, model_folders(self, settings))
        self.engine.warm_up()
        # Runs inside uvicorn's lifespan, after it installed its SIGTERM handler: bound its drain,
        # then wrap it so this worker outlives the HTTP workers' drain.
        bound_graceful_shutdown(settings.shutdown_timeout_s)
        stop_after_siblings_on_sigterm(cap_s=settings.shutdown_timeout_s + DRAIN_MARGIN_S)
        record_model_info(self.engine.models.values())
        logger.info("model worker ready: %s", ", ".join(self.engine.models))

    def __is_ready__(self) -> bool:
        return self.engine.ready

    def run_batch(self, model: str, jobs: list[Job]) -> list[JobOutcome]:
        """One adaptive batch of one model's jobs through the engine, observed."""
        handoffs = [(job.sent_at, job.trace_context) for job in jobs]
        with BatchObservation(model, handoffs, self.engine.models[model].device) as batch:
            outcomes, reports = self.engine.run_jobs(jobs)
            batch.finish(reports[model])
        return outcomes

    @bentoml.api
    def describe(self) -> list[ModelStatus]:
        """Served models and whether each has run its warm-up pass (internal)."""
        return [
            ModelStatus(
                name=model.info.name,
                architecture=model.info.architecture,
                pretrained=model.info.pretrained,
                weights=model.info.weights,
                untrained=model.entry.untrained,
                device=model.info.device,
                dtype=model.info.dtype,
                runtime=model.info.runtime,
                ready=self.engine.ready,
                embed_dim=model.info.embed_dim,
                logit_scale=model.logit_scale,
                family=model.family,
                logit_bias=model.logit_bias,
                device_decode=model.info.name in self.engine.tensor_preprocessors,
            )
            for model in self.engine.models.values()
        ]
