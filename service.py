"""BentoML services: HTTP in, engine out.

``Evaluator`` is the public HTTP surface (routes under ``/evaluator``): it validates, decodes and
crops images in a thread pool, then hands pairs to ``Scorer``. ``Scorer`` holds the weights and
exposes one batchable API per model, so BentoML's adaptive batching merges concurrent single
requests and the items of batch requests into shared forward passes (a batchable API called from
inside its own service would skip the batcher, hence two services).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

import aiohttp
import bentoml
import httpx
import numpy as np
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from clip_runtime import ClipEngine, ClipError, Preprocessing, ScoreJob, check_text, get_settings
from clip_runtime import errors as E
from clip_runtime.engine import fetch_policy, resolve_model_name
from clip_runtime.fetch import fetch_image_bytes
from clip_runtime.images import decode_image_field, is_url
from clip_runtime.model_entry import ModelEntry, store_name
from clip_runtime.overload import InFlightLimitMiddleware, PairQueue
from clip_runtime.scoring import (
    clip_score,
    cosines,
    paper_clip_s,
    ref_clip_score,
    softmax_probabilities,
)
from clip_runtime.settings import KNOWN_MODELS
from clip_runtime.shutdown import stop_after_siblings_on_sigterm
from clip_service.image import BENTO_IMAGE
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
    E.OverloadedError: HTTPStatus.SERVICE_UNAVAILABLE,
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
    clip_s: float | None = Field(
        default=None, description='with scale="paper": Hessel et al.\'s 2.5 * max(cos, 0)'
    )
    ref_clip_score: float | None = Field(
        default=None, description="with references: RefCLIPScore (Hessel et al. 2021)"
    )


class BatchItem(BaseModel):
    image: str | None = Field(default=None, description="base64, data: URI or http(s) URL")
    text: str | None = None
    references: list[str] | None = Field(default=None, description="reference captions")


class BatchItemResult(BaseModel):
    index: int
    score: float | None
    cosine: float | None
    text_truncated: bool
    error: ItemError | None
    clip_s: float | None = None
    ref_clip_score: float | None = None


class RankCandidate(BaseModel):
    index: int
    cosine: float
    score: float
    probability: float = Field(description="softmax(logit_scale * cosine) over the candidates")


class RankResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    ranked: Literal["texts", "images"]
    logit_scale: float
    results: list[RankCandidate] = Field(description="in request order")
    best: int = Field(description="index of the most similar candidate")


class EmbeddingsResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    dim: int
    embeddings: list[list[float]] = Field(description="L2-normalised float32, request order")
    text_truncated: list[bool] | None = None


@dataclass
class PreparedPair:
    job: PairJob
    references: list[PairJob]


Scale = Literal["torchmetrics", "paper"]


def _vector(raw: bytes | None) -> np.ndarray:
    if raw is None:
        raise RuntimeError("the scorer returned no embedding for a job that asked for one")
    return np.frombuffer(raw, dtype=np.float32)


def _add_optional_scores(
    result: SingleResult | BatchItemResult, cosine: float, ref_score: float | None, scale: Scale
) -> None:
    """Optional fields are set only when asked for, so plain answers keep the plain contract."""
    if scale == "paper":
        result.clip_s = paper_clip_s(cosine)
    if ref_score is not None:
        result.ref_clip_score = ref_score


def _json(result: BaseModel) -> JSONResponse:
    return JSONResponse(result.model_dump(mode="json", exclude_unset=True))


def _at_index(error: ClipError, field: str, index: int) -> ClipError:
    """The same error (same code), saying which element of a list was at fault."""
    located = copy.copy(error)
    located.message = f"{field}[{index}]: {error.message}"
    return located


class BatchResult(BaseModel):
    model: str
    pretrained: str | None
    weights: str
    results: list[BatchItemResult]
    succeeded: int
    failed: int


class PairJob(BaseModel):
    """A job on its way to a model batch: an HWC uint8 crop (raw bytes) and/or a text. Both: a
    pair to score; one: an embedding. ``keep_vectors`` also returns a pair's embeddings."""

    crop: bytes | None = None
    height: int = 0
    width: int = 0
    text: str | None = None
    keep_vectors: bool = False
    sent_at: float = Field(default=0.0, description="wall clock when handed to the scorer")
    traceparent: str = Field(default="", description="W3C trace context of the request")


class PairOutcome(BaseModel):
    cosine: float | None
    text_truncated: bool
    image_vector: bytes | None = None  # float32, L2-normalised
    text_vector: bytes | None = None


class ModelStatus(BaseModel):
    name: str
    architecture: str
    pretrained: str | None
    weights: str
    untrained: bool
    device: str
    dtype: str
    ready: bool
    embed_dim: int
    logit_scale: float


def _not_saved(reference: Any) -> E.ModelStoreError:
    return E.ModelStoreError(
        f"model {reference.tag} is not in the BentoML model store (BENTOML_HOME). "
        "Save it with `python scripts/save_models.py` (or add --random-init for an "
        "offline demo), or serve fewer models with CLIP_MODELS."
    )


def _model_folders(owner: Any) -> dict[str, Path]:
    """Store folders of the served models, with a clear error when one was never saved."""
    folders: dict[str, Path] = {}
    for name in settings.models:
        reference = type(owner).__dict__[MODEL_ATTRS[name]]
        if reference.stored is None:  # checked first: resolving would try BentoCloud
            raise _not_saved(reference)
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
        reference = bentoml.models.BentoModel(store_name(name))
        if reference.stored is None:  # at import, so `serve` names the fix, not BentoCloud
            raise _not_saved(reference)
        setattr(cls, MODEL_ATTRS[name], reference)
        if batch_apis:
            setattr(cls, SCORE_APIS[name], _batch_api(name))
    return cls


class ScorerImpl:
    def __init__(self) -> None:
        configure_logging(settings.log_format)
        self.engine = ClipEngine(settings, _model_folders(self))
        self.engine.warm_up()
        # Runs inside uvicorn's lifespan, after it installed its SIGTERM handler: wrap it so
        # this worker outlives the HTTP workers' drain (cap above `make serve`'s 60 s drain).
        stop_after_siblings_on_sigterm(cap_s=90)
        record_model_info(self.engine.models.values())
        logger.info("Scorer ready: %s", ", ".join(self.engine.models))

    def __is_ready__(self) -> bool:
        return self.engine.ready

    def score_jobs(self, model_name: str, jobs: list[PairJob]) -> list[PairOutcome]:
        handoffs = [(job.sent_at, job.traceparent) for job in jobs]
        device = self.engine.models[model_name].device
        with BatchObservation(model_name, handoffs, device) as batch:
            engine_jobs = [
                ScoreJob(model_name, _crop_array(job), job.text, job.keep_vectors) for job in jobs
            ]
            outcomes, reports = self.engine.run_jobs(engine_jobs)
            batch.finish(reports[model_name])
        return [
            PairOutcome(
                cosine=o.cosine,
                text_truncated=o.text_truncated,
                image_vector=None if o.image_vector is None else o.image_vector.tobytes(),
                text_vector=None if o.text_vector is None else o.text_vector.tobytes(),
            )
            for o in outcomes
        ]

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
                embed_dim=model.info.embed_dim,
                logit_scale=model.logit_scale,
            )
            for model in self.engine.models.values()
        ]


Scorer = bentoml.service(
    name="clip-scorer",
    workers=1,  # one process owns the accelerator; batches are what use it well
    traffic={"timeout": 600},
)(_with_served_models(ScorerImpl, batch_apis=True))


def _crop_array(job: PairJob) -> Any:
    if job.crop is None:
        return None
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


DEMO_PAGE = Path(__file__).resolve().parent / "web" / "demo.html"


async def demo(request: Request) -> Response:
    """A no-build HTML/JS page: upload an image, type captions, see their scores as bars."""
    return HTMLResponse(await asyncio.to_thread(DEMO_PAGE.read_text))


async def docs(request: Request) -> Response:
    return RedirectResponse("/", status_code=HTTPStatus.TEMPORARY_REDIRECT)


evaluator_routes = Starlette(
    routes=[
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/demo", demo, methods=["GET"]),
    ]
)


class EvaluatorImpl:
    scorer = bentoml.depends(Scorer)

    def __init__(self) -> None:
        configure_logging(settings.log_format)
        self.preprocessing = Preprocessing(settings, _model_folders(self))
        self.fetch_policy = fetch_policy(settings)
        self._statuses: dict[str, ModelStatus] = {}
        self.queue = PairQueue(settings.max_queued_pairs)
        self._pairs = service_metrics().pairs
        self._errors = service_metrics().errors
        for name, entry in self.preprocessing.entries.items():
            if entry.is_untrained:
                logger.warning("%s serves RANDOM-INIT weights: scores are meaningless", name)

    # -- helpers ------------------------------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        return self.preprocessing.entries[name]

    def _crop(self, name: str, data: bytes) -> PairJob:
        """Runs in the decode pool: checked image bytes -> model-sized crop."""
        crop = self.preprocessing.crop(name, data)
        return PairJob(crop=crop.tobytes(), height=crop.shape[0], width=crop.shape[1])

    def _crop_field(self, name: str, image: str) -> PairJob:
        return self._crop(name, decode_image_field(image, settings.max_image_bytes))

    async def _in_pool(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.preprocessing.pool, function, *args)

    async def _image_job(self, name: str, image: str | bytes | None) -> PairJob:
        """An image-only job: URL fetch (async) or base64 decode, then crop in the pool."""
        if image is None:
            raise E.InvalidRequestError("image is missing")
        if isinstance(image, str) and is_url(image):
            with stage(name, "fetch"):
                image = await fetch_image_bytes(image.strip(), self.fetch_policy)
        with stage(name, "decode"):  # pool queueing included: it is part of the wait
            if isinstance(image, bytes):
                return await self._in_pool(self._crop, name, image)
            return await self._in_pool(self._crop_field, name, image)

    @staticmethod
    def _text_job(text: str | None, what: str = "text") -> PairJob:
        if text is None:
            raise E.InvalidRequestError(f"{what} is missing")
        return PairJob(text=check_text(settings, text))

    async def _prepare(
        self, name: str, image: str | bytes | None, text: str | None, references: list[str] | None
    ) -> PreparedPair:
        """Validate one pair (and its references) and turn its image into a crop."""
        if text is None:
            raise E.InvalidRequestError("text is missing")
        check_text(settings, text)
        reference_jobs = [self._text_job(r, "reference") for r in references or []]
        if references is not None and not reference_jobs:
            raise E.InvalidRequestError("references is empty")
        if len(reference_jobs) > settings.max_candidates:
            raise E.TooManyItemsError(f"at most {settings.max_candidates} references per pair")
        job = await self._image_job(name, image)
        job.text, job.keep_vectors = text, bool(reference_jobs)
        return PreparedPair(job, reference_jobs)

    async def _score_pairs(
        self, name: str, pairs: list[PreparedPair]
    ) -> list[tuple[PairOutcome, float | None]]:
        """Pairs and their references in one model batch; RefCLIPScore where references came."""
        jobs = [job for pair in pairs for job in (pair.job, *pair.references)]
        outcomes = iter(await self._score(name, jobs) if jobs else [])
        scored = []
        for pair in pairs:
            outcome = next(outcomes)
            reference_outcomes = [next(outcomes) for _ in pair.references]
            ref_score = None
            if reference_outcomes:
                caption = _vector(outcome.text_vector)
                similarities = [float(_vector(r.text_vector) @ caption) for r in reference_outcomes]
                ref_score = ref_clip_score(outcome.cosine or 0.0, similarities)
            scored.append((outcome, ref_score))
        return scored

    async def _model_status(self, name: str) -> ModelStatus:
        if name not in self._statuses:
            for status in await self.scorer.to_async.describe():
                parsed = ModelStatus.model_validate(status)
                self._statuses[parsed.name] = parsed
        return self._statuses[name]

    async def _score(self, name: str, jobs: list[PairJob]) -> list[PairOutcome]:
        self.queue.acquire(len(jobs))
        attributes = {"clip.model": name, "clip.pairs": len(jobs)}
        try:
            with tracer.start_as_current_span("clip.model_call", attributes=attributes):
                for job in jobs:  # for the queue-wait metric and the batch span's links
                    job.sent_at, job.traceparent = time.time(), current_traceparent()
                outcomes = await getattr(self.scorer.to_async, SCORE_APIS[name])(jobs)
        except bentoml.exceptions.ServiceUnavailable as exc:
            # The batcher cancels what cannot meet max_latency_ms: that is overload too.
            raise E.OverloadedError("the model queue is full; retry later") from exc
        except (aiohttp.ClientError, httpx.HTTPError, ConnectionError) as exc:
            # The model worker is restarting (or was just killed): a 503 to retry, not a 500.
            logger.warning("scorer unreachable: %s", exc)
            raise E.ModelNotReadyError("the model worker is not reachable; retry later") from exc
        finally:
            self.queue.release(len(jobs))
        return [PairOutcome.model_validate(outcome) for outcome in outcomes]

    def _count_error(self, name: str, error: ClipError) -> None:
        self._errors.labels(error.code).inc()
        # A requested name that is not served is client input: one label for all of them.
        self._pairs.labels(name if name in settings.models else "unknown", "error").inc()

    async def _single(
        self,
        image: str | bytes,
        text: str,
        model: str | None,
        ctx: bentoml.Context,
        references: list[str] | None = None,
        scale: Scale = "torchmetrics",
    ) -> Response:
        try:
            name = resolve_model_name(settings, model)
            pair = await self._prepare(name, image, text, references)
            if await ctx.request.is_disconnected():
                raise ClientGoneError  # do not queue model work nobody will read
            ((outcome, ref_score),) = await self._score_pairs(name, [pair])
        except ClipError as error:
            self._count_error(model or settings.default_model, error)
            return error_response(error, ctx)
        entry = self._entry(name)
        self._pairs.labels(name, "ok").inc()
        cosine = outcome.cosine or 0.0
        result = SingleResult(
            score=clip_score(cosine),
            cosine=cosine,
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            text_truncated=outcome.text_truncated,
        )
        _add_optional_scores(result, cosine, ref_score, scale)
        return _json(result)

    # -- endpoints ----------------------------------------------------------------------------

    @bentoml.api(route="/evaluator/v1/evaluation/single")
    async def evaluate_single(
        self,
        image: str,
        text: str,
        ctx: bentoml.Context,
        model: str | None = None,
        references: list[str] | None = None,
        scale: Scale = "torchmetrics",
    ) -> SingleResult:
        """CLIP score of one image-caption pair. `image`: base64, data: URI or http(s) URL.
        `references` adds RefCLIPScore; `scale="paper"` adds Hessel et al.'s CLIP-S."""
        return await self._single(image, text, model, ctx, references, scale)  # type: ignore[return-value]

    @bentoml.api(route="/evaluator/v1/evaluation/single/upload")
    async def evaluate_single_upload(
        self, image: Path, text: str, ctx: bentoml.Context, model: str | None = None
    ) -> SingleResult:
        """CLIP score of one uploaded image file (multipart/form-data) and a caption."""
        data = await asyncio.to_thread(image.read_bytes)
        return await self._single(data, text, model, ctx)  # type: ignore[return-value]

    @bentoml.api(route="/evaluator/v1/evaluation/batch")
    async def evaluate_batch(
        self,
        items: list[BatchItem],
        ctx: bentoml.Context,
        model: str | None = None,
        scale: Scale = "torchmetrics",
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
            *(self._prepare(name, item.image, item.text, item.references) for item in items),
            return_exceptions=True,
        )
        for outcome in prepared:
            if isinstance(outcome, BaseException) and not isinstance(outcome, ClipError):
                raise outcome
        if await ctx.request.is_disconnected():
            return error_response(ClientGoneError(), ctx)  # type: ignore[return-value]
        pairs = [pair for pair in prepared if isinstance(pair, PreparedPair)]
        try:
            outcomes = iter(await self._score_pairs(name, pairs))
        except E.OverloadedError as error:
            self._count_error(name, error)
            return error_response(error, ctx)  # type: ignore[return-value]
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
            outcome, ref_score = next(outcomes)
            self._pairs.labels(name, "ok").inc()
            cosine = outcome.cosine or 0.0
            result = BatchItemResult(
                index=index,
                score=clip_score(cosine),
                cosine=cosine,
                text_truncated=outcome.text_truncated,
                error=None,
            )
            _add_optional_scores(result, cosine, ref_score, scale)
            results.append(result)
        entry = self._entry(name)
        failed = sum(result.error is not None for result in results)
        return _json(  # type: ignore[return-value]
            BatchResult(
                model=name,
                pretrained=entry.pretrained,
                weights=entry.weights_source,
                results=results,
                succeeded=len(results) - failed,
                failed=failed,
            )
        )

    async def _embed(self, name: str, jobs: list[PairJob]) -> list[PairOutcome]:
        if len(jobs) > settings.max_batch_items:
            raise E.TooManyItemsError(f"at most {settings.max_batch_items} inputs per request")
        if not jobs:
            raise E.InvalidRequestError("no inputs")
        return await self._score(name, jobs)

    async def _image_jobs(self, name: str, images: list[str], field: str) -> list[PairJob]:
        """Image-only jobs; the first bad image fails the request, naming its index."""
        if len(images) > settings.max_batch_items:
            raise E.TooManyItemsError(f"at most {settings.max_batch_items} {field} per request")
        prepared = await asyncio.gather(
            *(self._image_job(name, image) for image in images), return_exceptions=True
        )
        for index, job in enumerate(prepared):
            if isinstance(job, ClipError):
                raise _at_index(job, field, index)
            if isinstance(job, BaseException):
                raise job
        return list(prepared)  # type: ignore[arg-type]

    @staticmethod
    def _text_jobs(texts: list[str], field: str) -> list[PairJob]:
        jobs = []
        for index, text in enumerate(texts):
            try:
                jobs.append(EvaluatorImpl._text_job(text))
            except ClipError as error:
                raise _at_index(error, field, index) from error
        return jobs

    @bentoml.api(route="/evaluator/v1/evaluation/rank")
    async def evaluate_rank(
        self,
        ctx: bentoml.Context,
        image: str | None = None,
        texts: list[str] | None = None,
        images: list[str] | None = None,
        text: str | None = None,
        model: str | None = None,
    ) -> RankResult:
        """Rank captions for one image (`image` + `texts`; zero-shot classification with label
        prompts) or images for one caption (`images` + `text`), with softmax probabilities
        under the model's own logit_scale."""
        try:
            name = resolve_model_name(settings, model)
            by_texts = image is not None and texts is not None and images is None and text is None
            by_images = images is not None and text is not None and image is None and texts is None
            if not (by_texts or by_images):
                raise E.InvalidRequestError(
                    "send either `image` and `texts`, or `images` and `text`"
                )
            candidates = texts if by_texts else images
            if not candidates:
                raise E.InvalidRequestError("no candidates to rank")
            if len(candidates) > settings.max_candidates:
                raise E.TooManyItemsError(f"at most {settings.max_candidates} candidates")
            if by_texts:
                query = [await self._image_job(name, image)]
                others = self._text_jobs(texts or [], "texts")
            else:
                query = [self._text_job(text)]
                others = await self._image_jobs(name, images or [], "images")
            outcomes = await self._score(name, query + others)
            status = await self._model_status(name)
        except ClipError as error:
            self._count_error(model or settings.default_model, error)
            return error_response(error, ctx)  # type: ignore[return-value]
        pick = (lambda o: o.text_vector) if by_texts else (lambda o: o.image_vector)
        anchor = _vector(outcomes[0].image_vector if by_texts else outcomes[0].text_vector)
        values = cosines(anchor, np.stack([_vector(pick(o)) for o in outcomes[1:]]))
        probabilities = softmax_probabilities(values, status.logit_scale)
        entry = self._entry(name)
        return _json(  # type: ignore[return-value]
            RankResult(
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
        )

    @bentoml.api(route="/evaluator/v1/embeddings/image")
    async def embed_images(
        self, images: list[str], ctx: bentoml.Context, model: str | None = None
    ) -> EmbeddingsResult:
        """L2-normalised image embeddings (float32), batched with everything else."""
        try:
            name = resolve_model_name(settings, model)
            outcomes = await self._embed(name, await self._image_jobs(name, images, "images"))
        except ClipError as error:
            self._count_error(model or settings.default_model, error)
            return error_response(error, ctx)  # type: ignore[return-value]
        vectors = [_vector(o.image_vector).tolist() for o in outcomes]
        return self._embeddings(name, vectors, None)  # type: ignore[return-value]

    @bentoml.api(route="/evaluator/v1/embeddings/text")
    async def embed_texts(
        self, texts: list[str], ctx: bentoml.Context, model: str | None = None
    ) -> EmbeddingsResult:
        """L2-normalised text embeddings (float32); `text_truncated` per text."""
        try:
            name = resolve_model_name(settings, model)
            outcomes = await self._embed(name, self._text_jobs(texts, "texts"))
        except ClipError as error:
            self._count_error(model or settings.default_model, error)
            return error_response(error, ctx)  # type: ignore[return-value]
        vectors = [_vector(o.text_vector).tolist() for o in outcomes]
        truncated = [o.text_truncated for o in outcomes]
        return self._embeddings(name, vectors, truncated)  # type: ignore[return-value]

    def _embeddings(
        self, name: str, vectors: list[list[float]], truncated: list[bool] | None
    ) -> JSONResponse:
        entry = self._entry(name)
        result = EmbeddingsResult(
            model=name,
            pretrained=entry.pretrained,
            weights=entry.weights_source,
            dim=len(vectors[0]),
            embeddings=vectors,
        )
        if truncated is not None:
            result.text_truncated = truncated
        return _json(result)

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
    image=BENTO_IMAGE,
)(bentoml.asgi_app(evaluator_routes, path="/evaluator")(_with_served_models(EvaluatorImpl)))
Evaluator.add_asgi_middleware(
    RequestGuardMiddleware,
    max_request_bytes=settings.max_request_bytes,
    api_keys=tuple(settings.api_keys),
    open_paths=tuple(settings.auth_open_paths),
    retry_after_s=settings.retry_after_s,
)
Evaluator.add_asgi_middleware(  # after the guard, so inside it: sheds carry the request id
    InFlightLimitMiddleware,
    limit=settings.max_in_flight,
    retry_after_s=settings.retry_after_s,
    prefix="/evaluator/v1/",
)
# Request metrics labelled by these paths only (anything else: "/{unknown}"); BentoML's own.
bound_request_metric_paths(
    {api.route for service in (Evaluator, Scorer) for api in service.apis.values()}
    | {"/evaluator" + route.path for route in evaluator_routes.routes}
    | {"/", "/docs.json", "/livez", "/readyz", "/healthz", "/metrics", "/schema.json"}
)
