"""BentoML services: HTTP in, engine out.

``Evaluator`` is the public HTTP surface (routes under ``/evaluator``): it validates, decodes and
crops images in a thread pool, then hands pairs to ``Scorer``. ``Scorer`` holds the weights and
exposes one batchable API per model, so BentoML's adaptive batching merges concurrent single
requests and the items of batch requests into shared forward passes (a batchable API called from
inside its own service would skip the batcher, hence two services).
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from clip_runtime import ClipEngine, ClipError, Preprocessing, ScoreJob, check_text, get_settings
from clip_runtime import errors as E
from clip_runtime.engine import fetch_policy, resolve_model_name
from clip_runtime.fetch import fetch_image_bytes
from clip_runtime.images import decode_image_field, is_url
from clip_runtime.model_entry import ModelEntry, store_name
from clip_runtime.settings import KNOWN_MODELS
from http_layer import RequestGuardMiddleware, error_body
from observability import (
    BatchObservation,
    bound_request_metric_paths,
    configure_logging,
    current_traceparent,
    record_model_info,
    service_metrics,
    setup_tracing,
    stage,
    tracer,
)

logger = logging.getLogger("clip_service")
settings = get_settings()
setup_tracing()

# The one table from domain error to HTTP status (codes are the errors' own ``code``).
ERROR_STATUS: dict[type[ClipError], HTTPStatus] = {
    E.InvalidRequestError: HTTPStatus.BAD_REQUEST,
    E.InvalidImageError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UnsupportedImageFormatError: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    E.ImageTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.ImageDimensionsTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.ImageTooSmallError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.EmptyTextError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.InvalidTextError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.TextTooLongError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.TooManyItemsError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.RequestTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.UnknownModelError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UrlNotAllowedError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UrlFetchFailedError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UnauthorizedError: HTTPStatus.UNAUTHORIZED,
    E.ModelNotReadyError: HTTPStatus.SERVICE_UNAVAILABLE,
}
CLIENT_CLOSED_REQUEST = 499  # nobody reads it; it shows in access logs and metrics

# Model name -> the model store reference (class attributes, so `bentoml build` bundles them).
MODEL_ATTRS: dict[str, str] = {name: store_name(name).replace("-", "_") for name in KNOWN_MODELS}
# Model name -> the Scorer API that batches its pairs.
SCORE_APIS: dict[str, str] = {name: "score_" + attr for name, attr in MODEL_ATTRS.items()}


class ClientGoneError(ClipError):
    """The client disconnected before its pairs reached a model batch (status 499, nginx's)."""

    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("client closed the request")


def error_response(error: ClipError, ctx: bentoml.Context) -> JSONResponse:
    """The error envelope (the request id is added by the middleware). BentoML overwrites a
    returned response's status with the context's when the API takes a context, so set both."""
    status = (
        CLIENT_CLOSED_REQUEST
        if isinstance(error, ClientGoneError)
        else ERROR_STATUS.get(type(error), HTTPStatus.INTERNAL_SERVER_ERROR)
    )
    ctx.response.status_code = status
    return JSONResponse(error_body(error.code, error.message), status_code=status)


# -- wire schemas ------------------------------------------------------------------------------


class ItemError(BaseModel):
    code: str
    message: str


class SingleResult(BaseModel):
    score: float = Field(description="100 * max(cosine, 0), torchmetrics' CLIPScore scale")
    cosine: float = Field(description="cosine of the L2-normalised image and text embeddings")
    model: str
    pretrained: str | None = Field(description="open_clip tag; null for non-pretrained weights")
    weights: str = Field(description="pretrained | checkpoint | random-init (untrained!)")
    text_truncated: bool = Field(description="the caption had more than 77 tokens")


class BatchItem(BaseModel):
    image: str | None = Field(default=None, description="base64 or data: URI")
    text: str | None = None


class BatchItemResult(BaseModel):
    index: int
    score: float | None
    cosine: float | None
    text_truncated: bool
    error: ItemError | None


class BatchResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    results: list[BatchItemResult]
    succeeded: int
    failed: int


class PairJob(BaseModel):
    """A preprocessed pair on its way to a model batch (HWC uint8 crop as raw bytes)."""

    crop: bytes
    height: int
    width: int
    text: str
    sent_at: float = Field(default=0.0, description="wall clock when handed to the scorer")
    traceparent: str = Field(default="", description="W3C trace context of the request")


class PairOutcome(BaseModel):
    cosine: float
    text_truncated: bool


class ModelStatus(BaseModel):
    name: str
    architecture: str
    pretrained: str | None
    weights: str
    untrained: bool
    device: str
    dtype: str
    ready: bool


def _model_folders(owner: Any) -> dict[str, Path]:
    """Store folders of the served models, with a clear error when one was never saved."""
    folders: dict[str, Path] = {}
    for name in settings.models:
        reference = type(owner).__dict__[MODEL_ATTRS[name]]
        if reference.stored is None:  # checked first: resolving would try BentoCloud
            raise E.ModelStoreError(
                f"model {reference.tag} is not in the BentoML model store (BENTOML_HOME). "
                "Save it with `python scripts/save_models.py` (or add --random-init for an "
                "offline demo), or serve fewer models with CLIP_MODELS."
            )
        folders[name] = Path(getattr(owner, MODEL_ATTRS[name]).path)
    return folders


# -- the model worker --------------------------------------------------------------------------


def _batch_api(model_name: str) -> Any:
    def score(self: ScorerImpl, jobs: list[PairJob]) -> list[PairOutcome]:
        """Score preprocessed pairs with one model (internal, batched)."""
        return self.score_jobs(model_name, jobs)

    score.__name__ = score.__qualname__ = SCORE_APIS[model_name]  # BentoML names APIs by this
    return bentoml.api(
        batchable=True,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )(score)


def _with_served_models(cls: type, batch_apis: bool = False) -> type:
    """Add a store reference (and a batch API) per served model, as class attributes: BentoML
    resolves every referenced model at `serve` and bundles it at `build`, so only served ones."""
    for name in settings.models:
        if name not in MODEL_ATTRS:
            raise E.ModelStoreError(f"CLIP_MODELS names {name!r}; known: {list(KNOWN_MODELS)}")
        setattr(cls, MODEL_ATTRS[name], bentoml.models.BentoModel(store_name(name)))
        if batch_apis:
            setattr(cls, SCORE_APIS[name], _batch_api(name))
    return cls


class ScorerImpl:
    def __init__(self) -> None:
        configure_logging(settings.log_format)
        self.engine = ClipEngine(settings, _model_folders(self))
        self.engine.warm_up()
        record_model_info(self.engine.models.values())
        logger.info("Scorer ready: %s", ", ".join(self.engine.models))

    def __is_ready__(self) -> bool:
        return self.engine.ready

    def score_jobs(self, model_name: str, jobs: list[PairJob]) -> list[PairOutcome]:
        handoffs = [(job.sent_at, job.traceparent) for job in jobs]
        device = self.engine.models[model_name].device
        with BatchObservation(model_name, handoffs, device) as batch:
            score_jobs = [ScoreJob(model_name, _crop_array(job), job.text) for job in jobs]
            scores, reports = self.engine.score_jobs(score_jobs)
            batch.finish(reports[model_name])
        return [PairOutcome(cosine=s.cosine, text_truncated=s.text_truncated) for s in scores]

    @bentoml.api
    def describe(self) -> list[ModelStatus]:
        """Served models and whether each has run its warm-up pass (internal)."""
        return [
            ModelStatus(
                name=model.info.name,
                architecture=model.info.architecture,
                pretrained=model.info.pretrained,
                weights=model.info.weights_source,
                untrained=model.entry.is_untrained,
                device=model.info.device,
                dtype=model.info.dtype,
                ready=self.engine.ready,
            )
            for model in self.engine.models.values()
        ]


Scorer = bentoml.service(
    name="clip-scorer",
    workers=1,  # one process owns the accelerator; batches are what use it well
    traffic={"timeout": 600},
)(_with_served_models(ScorerImpl, batch_apis=True))


def _crop_array(job: PairJob) -> Any:
    import numpy as np

    return np.frombuffer(job.crop, dtype=np.uint8).reshape(job.height, job.width, 3)


# -- the HTTP front end ------------------------------------------------------------------------


async def health(request: Request) -> Response:
    evaluator: EvaluatorImpl = bentoml.get_current_service()
    return await evaluator.health()


async def metrics(request: Request) -> Response:
    # The same multiprocess-aggregated text as BentoML's /metrics (this container is what that
    # endpoint uses; bentoml is pinned for it).
    from bentoml._internal.configuration.containers import BentoMLContainer

    client = BentoMLContainer.metrics_client.get()
    body = await asyncio.to_thread(client.generate_latest)
    return Response(body, media_type=client.CONTENT_TYPE_LATEST)


async def docs(request: Request) -> Response:
    return RedirectResponse("/", status_code=HTTPStatus.TEMPORARY_REDIRECT)


evaluator_routes = Starlette(
    routes=[
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
)


class EvaluatorImpl:
    scorer = bentoml.depends(Scorer)

    def __init__(self) -> None:
        configure_logging(settings.log_format)
        self.preprocessing = Preprocessing(settings, _model_folders(self))
        self.fetch_policy = fetch_policy(settings)
        self._pairs = service_metrics().pairs
        self._errors = service_metrics().errors
        for name, entry in self.preprocessing.entries.items():
            if entry.is_untrained:
                logger.warning("%s serves RANDOM-INIT weights: scores are meaningless", name)

    # -- helpers ------------------------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        return self.preprocessing.entries[name]

    def _crop(self, name: str, data: bytes, text: str) -> PairJob:
        """Runs in the decode pool: checked image bytes -> model-sized crop."""
        crop = self.preprocessing.crop(name, data)
        return PairJob(crop=crop.tobytes(), height=crop.shape[0], width=crop.shape[1], text=text)

    def _crop_field(self, name: str, image: str, text: str) -> PairJob:
        return self._crop(name, decode_image_field(image, settings.max_image_bytes), text)

    async def _in_pool(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.preprocessing.pool, function, *args)

    async def _prepare(self, name: str, image: str | bytes | None, text: str | None) -> PairJob:
        """Validate one pair and turn it into a crop: URL fetch (async), then decode in the pool."""
        if image is None:
            raise E.InvalidRequestError("image is missing")
        if text is None:
            raise E.InvalidRequestError("text is missing")
        check_text(settings, text)
        if is_url(image):
            with stage(name, "fetch"):
                image = await fetch_image_bytes(image.strip(), self.fetch_policy)
        with stage(name, "decode"):  # pool queueing included: it is part of the wait
            if isinstance(image, bytes):
                return await self._in_pool(self._crop, name, image, text)
            return await self._in_pool(self._crop_field, name, image, text)

    async def _score(self, name: str, jobs: list[PairJob]) -> list[PairOutcome]:
        attributes = {"clip.model": name, "clip.pairs": len(jobs)}
        with tracer.start_as_current_span("clip.model_call", attributes=attributes):
            for job in jobs:  # for the queue-wait metric and the batch span's links
                job.sent_at, job.traceparent = time.time(), current_traceparent()
            outcomes = await getattr(self.scorer.to_async, SCORE_APIS[name])(jobs)
        return [PairOutcome.model_validate(outcome) for outcome in outcomes]

    def _count_error(self, name: str, error: ClipError) -> None:
        self._errors.labels(error.code).inc()
        # A requested name that is not served is client input: one label for all of them.
        self._pairs.labels(name if name in settings.models else "unknown", "error").inc()

    async def _single(
        self, image: str | bytes, text: str, model: str | None, ctx: bentoml.Context
    ) -> SingleResult | JSONResponse:
        try:
            name = resolve_model_name(settings, model)
            job = await self._prepare(name, image, text)
            if await ctx.request.is_disconnected():
                raise ClientGoneError  # do not queue model work nobody will read
            (outcome,) = await self._score(name, [job])
        except ClipError as error:
            self._count_error(model or settings.default_model, error)
            return error_response(error, ctx)
        entry = self._entry(name)
        self._pairs.labels(name, "ok").inc()
        return SingleResult(
            score=100.0 * max(outcome.cosine, 0.0),
            cosine=outcome.cosine,
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            text_truncated=outcome.text_truncated,
        )

    # -- endpoints ----------------------------------------------------------------------------

    @bentoml.api(route="/evaluator/v1/evaluation/single")
    async def evaluate_single(
        self, image: str, text: str, ctx: bentoml.Context, model: str | None = None
    ) -> SingleResult:
        """CLIP score of one image-caption pair. `image`: base64, data: URI or http(s) URL."""
        return await self._single(image, text, model, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/evaluator/v1/evaluation/single/upload")
    async def evaluate_single_upload(
        self, image: Path, text: str, ctx: bentoml.Context, model: str | None = None
    ) -> SingleResult:
        """CLIP score of one uploaded image file (multipart/form-data) and a caption."""
        data = await asyncio.to_thread(image.read_bytes)
        return await self._single(data, text, model, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/evaluator/v1/evaluation/batch")
    async def evaluate_batch(
        self, items: list[BatchItem], ctx: bentoml.Context, model: str | None = None
    ) -> BatchResult:
        """CLIP scores of many pairs, in request order; a bad item fails alone."""
        try:
            name = resolve_model_name(settings, model)
            if len(items) > settings.max_batch_items:
                raise E.TooManyItemsError(
                    f"{len(items)} items; at most {settings.max_batch_items} per request"
                )
            if not items:
                raise E.InvalidRequestError("items is empty")
        except ClipError as error:
            self._count_error(model or settings.default_model, error)
            return error_response(error, ctx)  # type: ignore[return-value]

        prepared = await asyncio.gather(
            *(self._prepare(name, item.image, item.text) for item in items),
            return_exceptions=True,
        )
        for outcome in prepared:
            if isinstance(outcome, BaseException) and not isinstance(outcome, ClipError):
                raise outcome
        if await ctx.request.is_disconnected():
            return error_response(ClientGoneError(), ctx)  # type: ignore[return-value]
        jobs = [job for job in prepared if isinstance(job, PairJob)]
        outcomes = iter(await self._score(name, jobs) if jobs else [])
        results: list[BatchItemResult] = []
        for index, job in enumerate(prepared):
            if isinstance(job, ClipError):
                self._count_error(name, job)
                results.append(
                    BatchItemResult(
                        index=index,
                        score=None,
                        cosine=None,
                        text_truncated=False,
                        error=ItemError(code=job.code, message=job.message),
                    )
                )
                continue
            outcome = next(outcomes)
            self._pairs.labels(name, "ok").inc()
            results.append(
                BatchItemResult(
                    index=index,
                    score=100.0 * max(outcome.cosine, 0.0),
                    cosine=outcome.cosine,
                    text_truncated=outcome.text_truncated,
                    error=None,
                )
            )
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

    async def health(self) -> Response:
        try:
            statuses = [
                ModelStatus.model_validate(s) for s in await self.scorer.to_async.describe()
            ]
        except Exception:  # the scorer is still loading, or gone: say so, do not raise
            logger.warning("health: scorer unreachable", exc_info=True)
            statuses = []
        served = {status.name: status for status in statuses}
        models = []
        for name in settings.models:
            entry = self._entry(name)
            status = served.get(name)
            models.append(
                {
                    "name": name,
                    "architecture": entry.architecture,
                    "pretrained": entry.pretrained,
                    "weights": entry.weights_source,
                    "untrained": entry.is_untrained,
                    "device": status.device if status else None,
                    "dtype": status.dtype if status else None,
                    "ready": bool(status and status.ready),
                }
            )
        ready = all(model["ready"] for model in models)
        body = {
            "status": "ok" if ready else "unavailable",
            "default_model": settings.default_model,
            "models": models,
        }
        return JSONResponse(
            body, status_code=HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        )


Evaluator = bentoml.service(
    name="clip-evaluator",
    traffic={"timeout": 600},
)(bentoml.asgi_app(evaluator_routes, path="/evaluator")(_with_served_models(EvaluatorImpl)))
Evaluator.add_asgi_middleware(
    RequestGuardMiddleware,
    max_request_bytes=settings.max_request_bytes,
    api_keys=tuple(settings.api_keys),
    open_paths=tuple(settings.auth_open_paths),
)
# Request metrics labelled by these paths only (anything else: "/{unknown}"); BentoML's own.
bound_request_metric_paths(
    {api.route for service in (Evaluator, Scorer) for api in service.apis.values()}
    | {"/evaluator" + route.path for route in evaluator_routes.routes}
    | {"/", "/docs.json", "/livez", "/readyz", "/healthz", "/metrics", "/schema.json"}
)
