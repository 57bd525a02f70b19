"""The front end's handlers (`clip-evaluator`): thin endpoints under ``/evaluator`` that
validate, turn inputs into jobs, hand them to the model worker and have the answer assembled
(``clip_service.answers``). Errors are raised and become answers in one place
(``clip_service.http_errors.api_errors``). The probes are in ``clip_service.probes``, the plain
routes in ``clip_service.routes``, the service's construction in ``clip_service.evaluator``.
Importing this module reads no settings: the service reads them when a worker starts."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np

from clip_runtime import Job, JobOutcome, Preprocessing, get_settings, resolve_model_name
from clip_runtime import errors as E
from clip_runtime.model_entry import ModelEntry
from clip_runtime.preprocessing import fetch_policy
from clip_service import answers
from clip_service.admission import PairQueue
from clip_service.bentoml_adapter import bound_graceful_shutdown, call_with_reconnect
from clip_service.health import WorkerModels
from clip_service.http_errors import ClientGoneError, api_errors
from clip_service.inputs import JobBuilder, PreparedPair, at_index
from clip_service.observability import (
    configure_logging,
    current_traceparent,
    record_error,
    record_pairs_scored,
    tracer,
)
from clip_service.openai_api import OpenAIEmbeddings
from clip_service.probes import MODEL_WORKER_UNREACHABLE, FrontEndProbes
from clip_service.schemas import (
    BatchItem,
    BatchItemResult,
    BatchResult,
    EmbeddingsResult,
    ModelStatus,
    RankResult,
    Scale,
    SingleResult,
    served_model_field,
)
from clip_service.store import batch_api_name, model_folders

logger = logging.getLogger("clip_service.front_end")

ServedModel = Annotated[
    str | None,
    served_model_field(
        "One of the served models: {names} (default `{default}`). /evaluator/health gives each "
        "one's family (clip or siglip) and tag."
    ),
]


# + POST /v1/embeddings (clip_service.openai_api), /readyz and health (clip_service.probes)
class FrontEnd(OpenAIEmbeddings, FrontEndProbes):
    model_worker: Any  # bentoml.depends(Scorer), set by clip_service.evaluator

    def __init__(self) -> None:
        # Cheap by design: this runs in uvicorn's lifespan, before the worker accepts a
        # connection. The crops are built in the background (see `ready`); no torch here.
        settings = self.settings = get_settings()  # read once per process, cached
        configure_logging(settings.log_format)
        bound_graceful_shutdown(settings.shutdown_timeout_s)  # in uvicorn's lifespan: see there
        self.preprocessing = Preprocessing(settings, model_folders(self, settings))
        self._jobs = JobBuilder(settings, self.preprocessing, fetch_policy(settings))
        self.queue = PairQueue(settings.max_queued_pairs)
        # Learned from the model worker once it is ready, and kept (see clip_service.health).
        self.worker_models = WorkerModels(
            lambda: call_with_reconnect(self.model_worker.to_async.describe)
        )
        for name, entry in self.preprocessing.entries.items():
            if entry.untrained:
                logger.warning("%s serves RANDOM-INIT weights: scores are meaningless", name)

    def _entry(self, name: str) -> ModelEntry:
        return self.preprocessing.entries[name]

    @property
    def jobs(self) -> JobBuilder:
        """Every endpoint's way to its inputs: 503 ``model_not_ready`` while starting."""
        self.preprocessing.check_ready()
        return self._jobs

    # -- the model call -----------------------------------------------------------------------

    async def _score(self, name: str, jobs: list[Job]) -> list[JobOutcome]:
        """Jobs through the model worker's batch API; every endpoint's one way to the model."""
        self.queue.acquire(len(jobs))
        attributes: dict[str, str | int] = {"clip.model": name, "clip.pairs": len(jobs)}
        try:
            with tracer.start_as_current_span("clip.model_call", attributes=attributes):
                for job in jobs:  # for the queue-wait metric and the batch span's links
                    job.sent_at, job.trace_context = time.time(), current_traceparent()
                batch_api = getattr(self.model_worker.to_async, batch_api_name(name))
                # Idempotent: one retry when the connection (not the model) failed.
                outcomes: list[JobOutcome] = await call_with_reconnect(lambda: batch_api(jobs))
        except bentoml.exceptions.ServiceUnavailable as exc:
            # The batcher cancels what cannot meet max_latency_ms: that is overload too.
            raise E.OverloadedError("the model queue is full; retry later") from exc
        except MODEL_WORKER_UNREACHABLE as exc:
            # The model worker is restarting (or was just killed): a 503 to retry, not a 500.
            logger.warning("model worker unreachable: %s", exc)
            raise E.ModelNotReadyError("the model worker is not reachable; retry later") from exc
        finally:
            self.queue.release(len(jobs))
        return outcomes

    async def _score_pairs(
        self, name: str, pairs: list[PreparedPair]
    ) -> list[tuple[JobOutcome, float | None]]:
        """Pairs and their references in one model batch; RefCLIPScore where references came."""
        jobs = [job for pair in pairs for job in (pair.job, *pair.references)]
        outcomes = iter(await self._score(name, jobs) if jobs else [])
        scored = []
        for pair in pairs:
            outcome = next(outcomes)
            references = [next(outcomes) for _ in pair.references]
            scored.append((outcome, answers.pair_ref_clip_score(outcome, references)))
        return scored

    async def _model_status(self, name: str) -> ModelStatus:
        return await self.worker_models.status(name)

    async def _embed(
        self, name: str, jobs: list[Job], field: str
    ) -> tuple[list[np.ndarray], list[JobOutcome]]:
        """Each single-tower job's embedding (and the outcomes); the first failed job fails the
        request, naming its index in ``field``."""
        outcomes = await self._score(name, jobs)
        vectors = []
        for index, (job, outcome) in enumerate(zip(jobs, outcomes, strict=True)):
            if outcome.error is not None:
                raise at_index(outcome.error, field, index)
            vectors.append(answers.embedding(job, outcome))
        return vectors, outcomes

    # -- endpoints ----------------------------------------------------------------------------

    async def _single(
        self,
        ctx: bentoml.Context,
        image: str | bytes,
        text: str,
        model: str | None,
        references: list[str] | None = None,
        scale: Scale = "torchmetrics",
    ) -> SingleResult:
        name = resolve_model_name(self.settings, model)
        pair = await self.jobs.pair(name, image, text, references)
        if await ctx.request.is_disconnected():
            raise ClientGoneError  # do not queue model work nobody will read
        ((outcome, ref_score),) = await self._score_pairs(name, [pair])
        if outcome.error is not None:
            raise outcome.error
        record_pairs_scored(name)
        return answers.single_result(name, self._entry(name), outcome, ref_score, scale)

    @bentoml.api(route="/evaluator/v1/evaluation/single")
    @api_errors
    async def evaluate_single(
        self,
        image: str,
        text: str,
        ctx: bentoml.Context,
        model: ServedModel = None,
        references: list[str] | None = None,
        scale: Scale = "torchmetrics",
    ) -> SingleResult:
        """CLIP score of one image-caption pair. `image`: base64, data: URI or http(s) URL.
        `references` adds RefCLIPScore; `scale="paper"` adds Hessel et al.'s CLIP-S."""
        return await self._single(ctx, image, text, model, references, scale)

    @bentoml.api(route="/evaluator/v1/evaluation/single/upload")
    @api_errors
    async def evaluate_single_upload(
        self, image: Path, text: str, ctx: bentoml.Context, model: ServedModel = None
    ) -> SingleResult:
        """CLIP score of one uploaded image file (multipart/form-data) and a caption."""
        data = await asyncio.to_thread(image.read_bytes)
        return await self._single(ctx, data, text, model)

    @bentoml.api(route="/evaluator/v1/evaluation/batch")
    @api_errors
    async def evaluate_batch(
        self,
        items: list[BatchItem],
        ctx: bentoml.Context,
        model: ServedModel = None,
        scale: Scale = "torchmetrics",
    ) -> BatchResult:
        """CLIP scores of many pairs, in request order; a bad item fails alone."""
        name = resolve_model_name(self.settings, model)
        self.jobs.check_count(len(items), "items")
        gathered = await asyncio.gather(
            *(self.jobs.pair(name, item.image, item.text, item.references) for item in items),
            return_exceptions=True,
        )
        prepared: list[PreparedPair | E.ClipError] = []
        for pair in gathered:  # a bad item fails alone; anything else is a bug: raise it
            if isinstance(pair, BaseException) and not isinstance(pair, E.ClipError):
                raise pair
            prepared.append(pair)
        if await ctx.request.is_disconnected():
            raise ClientGoneError
        pairs = [pair for pair in prepared if isinstance(pair, PreparedPair)]
        scored = iter(await self._score_pairs(name, pairs))
        results: list[BatchItemResult] = []
        for index, item in enumerate(prepared):
            if not isinstance(item, PreparedPair):
                results.append(self._failed_item(name, index, item))
                continue
            outcome, ref_score = next(scored)
            if outcome.error is not None:
                results.append(self._failed_item(name, index, outcome.error))
                continue
            record_pairs_scored(name)
            results.append(answers.scored_item(index, outcome, ref_score, scale))
        return answers.batch_result(name, self._entry(name), results)

    @staticmethod
    def _failed_item(name: str, index: int, error: E.ClipError) -> BatchItemResult:
        record_error(name, error.code)
        return answers.failed_item(index, error)

    @bentoml.api(route="/evaluator/v1/evaluation/rank")
    @api_errors
    async def evaluate_rank(
        self,
        ctx: bentoml.Context,
        image: str | None = None,
        texts: list[str] | None = None,
        images: list[str] | None = None,
        text: str | None = None,
        model: ServedModel = None,
    ) -> RankResult:
        """Rank captions for one image (`image` + `texts`; zero-shot classification with label
        prompts) or images for one caption (`images` + `text`), with probabilities the way the
        model's family was trained (CLIP: softmax; SigLIP: sigmoid with its logit_bias)."""
        name = resolve_model_name(self.settings, model)
        by_texts = image is not None and texts is not None and images is None and text is None
        by_images = images is not None and text is not None and image is None and texts is None
        if not (by_texts or by_images):
            raise E.InvalidRequestError("send either `image` and `texts`, or `images` and `text`")
        candidates = (texts if by_texts else images) or []
        if not candidates:
            raise E.InvalidRequestError("no candidates to rank")
        if len(candidates) > self.settings.max_candidates:
            raise E.TooManyItemsError(f"at most {self.settings.max_candidates} candidates")
        if by_texts:
            query = [await self.jobs.image_job(name, image)]
            others = await self.jobs.text_jobs(name, candidates, "texts")
        else:
            query = [await self.jobs.text_job(name, text)]
            others = await self.jobs.image_jobs(name, candidates, "images")
        (anchor, *vectors), _ = await self._embed(name, query + others, "candidates")
        status = await self._model_status(name)
        ranked: Literal["texts", "images"] = "texts" if by_texts else "images"
        return answers.rank_result(name, self._entry(name), status, ranked, anchor, vectors)

    @bentoml.api(route="/evaluator/v1/embeddings/image")
    @api_errors
    async def embed_images(
        self, images: list[str], ctx: bentoml.Context, model: ServedModel = None
    ) -> EmbeddingsResult:
        """L2-normalized image embeddings (float32), batched with everything else."""
        name = resolve_model_name(self.settings, model)
        jobs = await self.jobs.image_jobs(name, images, "images")
        vectors, _ = await self._embed(name, jobs, "images")
        return answers.embeddings_result(name, self._entry(name), vectors)

    @bentoml.api(route="/evaluator/v1/embeddings/text")
    @api_errors
    async def embed_texts(
        self, texts: list[str], ctx: bentoml.Context, model: ServedModel = None
    ) -> EmbeddingsResult:
        """L2-normalized text embeddings (float32); `text_truncated` per text."""
        name = resolve_model_name(self.settings, model)
        jobs = await self.jobs.text_jobs(name, texts, "texts")
        vectors, outcomes = await self._embed(name, jobs, "texts")
        truncated = [outcome.text_truncated for outcome in outcomes]
        return answers.embeddings_result(name, self._entry(name), vectors, truncated)
