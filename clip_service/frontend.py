"""The HTTP front end (`clip-evaluator`): thin endpoints under ``/evaluator`` that validate, turn
inputs into jobs, hand them to the model worker and assemble the answer. Errors are raised and
become answers in one place (``clip_service.errors.api_errors``)."""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import httpx
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from clip_runtime import Job, JobOutcome, Preprocessing, get_settings, resolve_model_name
from clip_runtime import errors as E
from clip_runtime.model_entry import ModelEntry, embed_dim
from clip_runtime.preprocessing import fetch_policy
from clip_runtime.scoring import (
    clip_score,
    cosines,
    paper_clip_s,
    rank_probabilities,
    ref_clip_score,
)
from clip_service.admission import PairQueue
from clip_service.bentoml_adapter import (
    bound_graceful_shutdown,
    call_with_reconnect,
    document_openapi,
    forbid_unknown_fields,
    metrics_text,
)
from clip_service.errors import ClientGoneError, api_errors
from clip_service.health import WorkerModels, health_result
from clip_service.image import BENTO_IMAGE
from clip_service.inputs import JobBuilder, PreparedPair, at_index
from clip_service.middleware import middleware_stack
from clip_service.middleware.error_envelope import input_fields_by_route
from clip_service.multipart_guard import file_fields_by_route
from clip_service.observability import (
    configure_logging,
    current_traceparent,
    record_error,
    record_pairs_scored,
    tracer,
)
from clip_service.openai_api import OpenAIEmbeddings, mount_openai_routes, openai_route_paths
from clip_service.openapi import service_document
from clip_service.schemas import (
    BatchItem,
    BatchItemResult,
    BatchResult,
    EmbeddingsResult,
    HealthResult,
    ItemError,
    ModelStatus,
    RankCandidate,
    RankResult,
    Scale,
    SingleResult,
    served_model_field,
)
from clip_service.store import (
    add_store_references,
    batch_api_name,
    model_folders,
    stored_folders,
)
from clip_service.worker import Scorer

logger = logging.getLogger("clip_service.frontend")
settings = get_settings()

ServedModel = Annotated[str | None, served_model_field(settings.models, settings.default_model)]
DEMO_PAGE = Path(__file__).resolve().parents[1] / "web" / "demo.html"
# How long a probe (/readyz, /evaluator/health) waits for the model worker: probes must answer
# within a Kubernetes probe's timeout, whether the model worker is up, loading or gone.
SCORER_PROBE_TIMEOUT_S = 1.0
# What a call to the model worker raises when it is restarting, killed or not listening.
SCORER_UNREACHABLE = (aiohttp.ClientError, httpx.HTTPError, ConnectionError)
EVALUATOR_PATH = "/evaluator"  # where the plain routes beside the APIs are mounted
HEALTH_ROUTE = "/health"  # its 503 is a health document, not an error envelope


def _vector(vector: np.ndarray | None) -> np.ndarray:
    if vector is None:
        raise RuntimeError("the model worker returned no embedding for a job that asked for one")
    return vector


def _with_optional_scores(
    result: SingleResult | BatchItemResult, cosine: float, ref_score: float | None, scale: Scale
) -> None:
    if scale == "paper":
        result.clip_s = paper_clip_s(cosine)
    if ref_score is not None:
        result.ref_clip_score = ref_score


class EvaluatorImpl(OpenAIEmbeddings):  # + POST /v1/embeddings (clip_service.openai_api)
    scorer = bentoml.depends(Scorer)

    def __init__(self) -> None:
        # Cheap by design: this runs in uvicorn's lifespan, before the worker accepts a
        # connection. The crops are built in the background (see `ready`); no torch here.
        configure_logging(settings.log_format)
        bound_graceful_shutdown(settings.shutdown_timeout_s)  # in uvicorn's lifespan: see there
        self.preprocessing = Preprocessing(settings, model_folders(self, settings))
        self._jobs = JobBuilder(settings, self.preprocessing, fetch_policy(settings))
        self.queue = PairQueue(settings.max_queued_pairs)
        # Learned from the model worker once it is ready, and kept (see clip_service.health).
        self.worker_models = WorkerModels(
            lambda: call_with_reconnect(self.scorer.to_async.describe)
        )
        for name, entry in self.preprocessing.entries.items():
            if entry.is_untrained:
                logger.warning("%s serves RANDOM-INIT weights: scores are meaningless", name)

    def _entry(self, name: str) -> ModelEntry:
        return self.preprocessing.entries[name]

    @property
    def jobs(self) -> JobBuilder:
        """Every endpoint's way to its inputs: 503 ``model_not_ready`` while starting."""
        self.preprocessing.check_ready()
        return self._jobs

    async def _scorer_ready(self) -> bool:
        """Whether the model worker says it is ready, asked with a short bound: while it loads,
        its socket accepts connections that nobody answers yet."""
        try:
            return await asyncio.wait_for(
                self.scorer.to_async.is_ready(SCORER_PROBE_TIMEOUT_S), SCORER_PROBE_TIMEOUT_S
            )
        except (TimeoutError, *SCORER_UNREACHABLE):
            return False

    async def __is_ready__(self) -> bool:
        """BentoML's `/readyz` (503 until True): preprocessing built and the model worker
        ready, answered within about a second at any point of start-up."""
        return self.preprocessing.ready and await self._scorer_ready()

    # -- the model call -----------------------------------------------------------------------

    async def _score(self, name: str, jobs: list[Job]) -> list[JobOutcome]:
        """Jobs through the model worker's batch API; every endpoint's one way to the model."""
        self.queue.acquire(len(jobs))
        attributes: dict[str, str | int] = {"clip.model": name, "clip.pairs": len(jobs)}
        try:
            with tracer.start_as_current_span("clip.model_call", attributes=attributes):
                for job in jobs:  # for the queue-wait metric and the batch span's links
                    job.sent_at, job.trace_context = time.time(), current_traceparent()
                batch_api = getattr(self.scorer.to_async, batch_api_name(name))
                # Idempotent: one retry when the connection (not the model) failed.
                outcomes: list[JobOutcome] = await call_with_reconnect(lambda: batch_api(jobs))
        except bentoml.exceptions.ServiceUnavailable as exc:
            # The batcher cancels what cannot meet max_latency_ms: that is overload too.
            raise E.OverloadedError("the model queue is full; retry later") from exc
        except SCORER_UNREACHABLE as exc:
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
            ref_score = None
            if references and outcome.error is None:
                caption = _vector(outcome.text_vector)
                similarities = [float(_vector(r.text_vector) @ caption) for r in references]
                ref_score = ref_clip_score(outcome.cosine or 0.0, similarities)
            scored.append((outcome, ref_score))
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
            vectors.append(
                _vector(outcome.image_vector if job.image is not None else outcome.text_vector)
            )
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
        name = resolve_model_name(settings, model)
        pair = await self.jobs.pair(name, image, text, references)
        if await ctx.request.is_disconnected():
            raise ClientGoneError  # do not queue model work nobody will read
        ((outcome, ref_score),) = await self._score_pairs(name, [pair])
        if outcome.error is not None:
            raise outcome.error
        entry = self._entry(name)
        record_pairs_scored(name)
        cosine = outcome.cosine or 0.0
        result = SingleResult(
            score=clip_score(cosine),
            cosine=cosine,
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            text_truncated=outcome.text_truncated,
        )
        _with_optional_scores(result, cosine, ref_score, scale)
        return result

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
        name = resolve_model_name(settings, model)
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
            cosine = outcome.cosine or 0.0
            result = BatchItemResult(
                index=index,
                score=clip_score(cosine),
                cosine=cosine,
                text_truncated=outcome.text_truncated,
                error=None,
            )
            _with_optional_scores(result, cosine, ref_score, scale)
            results.append(result)
        entry = self._entry(name)
        failed = sum(result.error is not None for result in results)
        return BatchResult(
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            results=results,
            succeeded=len(results) - failed,
            failed=failed,
        )

    @staticmethod
    def _failed_item(name: str, index: int, error: E.ClipError) -> BatchItemResult:
        record_error(name, error.code)
        return BatchItemResult(
            index=index,
            score=None,
            cosine=None,
            text_truncated=False,
            error=ItemError(code=error.code, message=error.message),
        )

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
        name = resolve_model_name(settings, model)
        by_texts = image is not None and texts is not None and images is None and text is None
        by_images = images is not None and text is not None and image is None and texts is None
        if not (by_texts or by_images):
            raise E.InvalidRequestError("send either `image` and `texts`, or `images` and `text`")
        candidates = (texts if by_texts else images) or []
        if not candidates:
            raise E.InvalidRequestError("no candidates to rank")
        if len(candidates) > settings.max_candidates:
            raise E.TooManyItemsError(f"at most {settings.max_candidates} candidates")
        if by_texts:
            query = [await self.jobs.image_job(name, image)]
            others = await self.jobs.text_jobs(name, candidates, "texts")
        else:
            query = [await self.jobs.text_job(name, text)]
            others = await self.jobs.image_jobs(name, candidates, "images")
        (anchor, *vectors), _ = await self._embed(name, query + others, "candidates")
        status = await self._model_status(name)
        values = cosines(anchor, np.stack(vectors))
        probabilities = rank_probabilities(
            values, status.family, status.logit_scale, status.logit_bias
        )
        entry = self._entry(name)
        return RankResult(
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            ranked="texts" if by_texts else "images",
            logit_scale=status.logit_scale,
            results=[
                RankCandidate(
                    index=i, cosine=float(c), score=clip_score(float(c)), probability=float(p)
                )
                for i, (c, p) in enumerate(zip(values, probabilities, strict=True))
            ],
            best=int(np.argmax(values)),
        )

    def _embeddings(
        self, name: str, vectors: list[np.ndarray], truncated: list[bool] | None = None
    ) -> EmbeddingsResult:
        entry = self._entry(name)
        result = EmbeddingsResult(
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            dim=len(vectors[0]),
            embeddings=[vector.tolist() for vector in vectors],
        )
        if truncated is not None:
            result.text_truncated = truncated
        return result

    @bentoml.api(route="/evaluator/v1/embeddings/image")
    @api_errors
    async def embed_images(
        self, images: list[str], ctx: bentoml.Context, model: ServedModel = None
    ) -> EmbeddingsResult:
        """L2-normalised image embeddings (float32), batched with everything else."""
        name = resolve_model_name(settings, model)
        jobs = await self.jobs.image_jobs(name, images, "images")
        vectors, _ = await self._embed(name, jobs, "images")
        return self._embeddings(name, vectors)

    @bentoml.api(route="/evaluator/v1/embeddings/text")
    @api_errors
    async def embed_texts(
        self, texts: list[str], ctx: bentoml.Context, model: ServedModel = None
    ) -> EmbeddingsResult:
        """L2-normalised text embeddings (float32); `text_truncated` per text."""
        name = resolve_model_name(settings, model)
        jobs = await self.jobs.text_jobs(name, texts, "texts")
        vectors, outcomes = await self._embed(name, jobs, "texts")
        return self._embeddings(name, vectors, [o.text_truncated for o in outcomes])

    async def health(self) -> tuple[HealthResult, bool]:
        """Every served model's status within about one probe timeout: readiness from the model
        worker's readiness probe (answered ahead of its batch queue), descriptions from what the
        front end keeps (asked for once per worker start, never waited on for long)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        worker_ready = self.preprocessing.ready and await self._scorer_ready()
        if worker_ready:
            left_s = SCORER_PROBE_TIMEOUT_S - (loop.time() - started)
            described = await self.worker_models.known(left_s)
        else:
            self.worker_models.forget()  # gone or restarting: describe the next one anew
            described = {}
        entries = {name: self._entry(name) for name in settings.models}
        return health_result(entries, settings.default_model, worker_ready, described)


# -- plain routes beside the APIs ---------------------------------------------------------------


async def health(request: Request) -> Response:
    evaluator: EvaluatorImpl = bentoml.get_current_service()
    result, ready = await evaluator.health()
    status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
    return JSONResponse(result.model_dump(mode="json"), status_code=status)


async def metrics(request: Request) -> Response:
    body, content_type = await asyncio.to_thread(metrics_text)
    return Response(body, media_type=content_type)


async def demo(request: Request) -> Response:
    """A no-build HTML/JS page: upload an image, type captions, see their scores as bars."""
    return HTMLResponse(await asyncio.to_thread(DEMO_PAGE.read_text))


async def docs(request: Request) -> Response:
    return RedirectResponse("/", status_code=HTTPStatus.TEMPORARY_REDIRECT)


evaluator_routes = Starlette(
    routes=[
        Route(HEALTH_ROUTE, health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/demo", demo, methods=["GET"]),
    ]
)

add_store_references(EvaluatorImpl, settings)
# Traffic limits: BentoML's own `traffic.max_concurrency` answers 429 without Retry-After and
# sheds /evaluator/health and /evaluator/metrics too, so the in-flight limit is
# InFlightLimitMiddleware's (503 `overloaded`, probes never shed). `timeout` bounds one request.
Evaluator = bentoml.service(
    name="clip-evaluator",
    # Every core parses, checks and (on CPU hosts) crops images; PairQueue and the in-flight
    # limit are per worker, so the service admits http_workers times their values.
    workers=settings.http_workers,
    traffic={"timeout": 600},
    image=BENTO_IMAGE,  # the Bento's container image (the entry service's is the Bento's)
)(bentoml.asgi_app(evaluator_routes, path=EVALUATOR_PATH)(EvaluatorImpl))
mount_openai_routes(Evaluator)  # GET /v1/models, and its place in the OpenAPI document
forbid_unknown_fields(Evaluator.apis.values())
EMBEDDING_SIZES = {name: embed_dim(folder) for name, folder in stored_folders(settings).items()}
document_openapi(Evaluator, lambda spec: service_document(spec, settings, EMBEDDING_SIZES))
for middleware, options in middleware_stack(  # in order: the first added is outermost
    settings,
    file_fields=file_fields_by_route(Evaluator.apis.values()),
    input_fields=input_fields_by_route(Evaluator.apis.values()),
    own_error_bodies=frozenset({EVALUATOR_PATH + HEALTH_ROUTE}),
):
    Evaluator.add_asgi_middleware(middleware, **options)

# Paths BentoML's request metrics may label (anything else: "/{unknown}").
ROUTES: frozenset[str] = frozenset(
    {api.route for service in (Evaluator, Scorer) for api in service.apis.values()}
    | {EVALUATOR_PATH + route.path for route in evaluator_routes.routes if isinstance(route, Route)}
    | openai_route_paths(settings.models)
    | {"/", "/docs.json", "/livez", "/readyz", "/healthz", "/metrics", "/schema.json"}
)
