"""The OpenAI-compatible door: ``POST /v1/embeddings`` and ``GET /v1/models`` in OpenAI's wire
format, so that its clients and integrations (the ``openai`` packages, LangChain, vector
databases' OpenAI modules, proxies) work with a base URL and a key.

A second door to the same model calls as ``/evaluator/v1/embeddings/*``: the same job builder
(decoding, limits, URL policy), the same model-worker batches, the same auth, body limits,
in-flight limit, metrics and traces. Only the shapes differ: OpenAI's request and response, and
OpenAI's error envelope ``{"error": {"message", "type", "param", "code"}}`` with our ``code``
values and the request id, at the statuses its clients act on (``OpenAIErrorShapeMiddleware``).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, Concatenate, ParamSpec, TypeVar

import bentoml
import numpy as np
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runtime import Job, JobOutcome, Preprocessing, resolve_model_name
from clip_runtime import errors as E
from clip_runtime.errors import ClipError
from clip_runtime.settings import ClipSettings
from clip_service.bentoml_adapter import OPENAPI_REF_TEMPLATE, document_plain_routes
from clip_service.http_errors import CURRENT_REQUEST_ID, http_status
from clip_service.inputs import JobBuilder, gathered_jobs
from clip_service.observability import record_error
from clip_service.openai_schemas import (
    Embedding,
    EmbeddingInput,
    EmbeddingList,
    EncodingFormat,
    ErrorResponse,
    ImageItem,
    ModelCard,
    ModelList,
    TextItem,
    Usage,
)
from clip_service.schemas import served_model_field
from clip_service.store import store_attribute

logger = logging.getLogger("clip_service.openai_api")

OPENAI_PATH = "/v1"  # OpenAI clients' base URL is the service's URL plus this
EMBEDDINGS_ROUTE = OPENAI_PATH + "/embeddings"
MODELS_ROUTE = "/models"  # under OPENAI_PATH
INPUT_FIELD = "input"
# OpenAI's little-endian float32, as its clients decode base64 embeddings.
BASE64_DTYPE = np.dtype("<f4")

# OpenAI's error ``type`` by status; anything else under 500 is an invalid request.
_ERROR_TYPES: dict[int, str] = {
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
}
# Our 422s and 415s (an input the model cannot use: a broken image, an empty text, a refused URL)
# are what OpenAI answers 400 invalid_request_error for; the rest keep their status.
_AS_BAD_REQUEST = frozenset({HTTPStatus.UNPROCESSABLE_ENTITY, HTTPStatus.UNSUPPORTED_MEDIA_TYPE})

ServedModelName = Annotated[
    str, served_model_field("One of the served models: {names} (GET /v1/models lists them).")
]
Dimensions = Annotated[
    int | None,
    Field(
        ge=1,  # `minimum`: OpenAPI 3.0 has no numeric exclusiveMinimum
        description="Only the model's own embedding size is accepted: CLIP embeddings are not "
        "trained to be truncated (not Matryoshka), so a shorter vector would not be a "
        "CLIP embedding.",
    ),
]


# -- errors ---------------------------------------------------------------------------------


def openai_status(status: int, code: str | None) -> int:
    """The status OpenAI's clients expect for one of our answers."""
    if code == E.UnknownModelError.code:
        return int(HTTPStatus.NOT_FOUND)
    return int(HTTPStatus.BAD_REQUEST) if status in _AS_BAD_REQUEST else status


def error_type(status: int) -> str:
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return "server_error"
    return _ERROR_TYPES.get(status, "invalid_request_error")


def openai_error_body(
    status: int, code: str | None, message: str, param: str | None, request_id: str | None
) -> dict[str, Any]:
    """OpenAI's error envelope, with our code and the request id."""
    error = ErrorResponse.model_validate(
        {
            "error": {
                "message": message,
                "type": error_type(status),
                "param": param,
                "code": code,
                "request_id": request_id,
            }
        }
    )
    return error.model_dump(mode="json", exclude_none=False)


def _param_of(detail: object) -> str | None:
    """The request field a validation error names (its first ``loc`` part)."""
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return None
    parts = [part for part in detail[0].get("loc", ()) if part != "body"]
    return str(parts[0]) if parts else None


def reshape_error(status: int, body: bytes) -> tuple[int, bytes]:
    """Any error answer (ours, the request guard's, the framework's) in OpenAI's shape and
    status; one already in that shape (it has a ``type``) keeps it."""
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and "type" in error:
        return status, body
    if not isinstance(error, dict):
        error = {"message": error} if isinstance(error, str) else {}
    code = error.get("code")
    shaped = openai_status(status, code)
    message = error.get("message") or HTTPStatus(status).phrase
    answer = openai_error_body(
        shaped, code, message, _param_of(error.get("detail")), error.get("request_id")
    )
    return shaped, json.dumps(answer).encode()


class OpenAIErrorShapeMiddleware:
    """Pure ASGI, outside the request guard: every error answer under ``prefix`` (the guard's
    own 401/408/413, the framework's validation errors, the in-flight limit's 503, ours) in
    OpenAI's shape and status. Success answers pass untouched; headers (``Retry-After``,
    ``WWW-Authenticate``, ``x-request-id``) are kept."""

    def __init__(self, app: ASGIApp, prefix: str = OPENAI_PATH + "/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        pending: Message | None = None
        chunks: list[bytes] = []

        async def shaped_send(message: Message) -> None:
            nonlocal pending
            if message["type"] == "http.response.start" and message["status"] >= 400:
                pending = message  # held until the body is known
                return
            if message["type"] != "http.response.body" or pending is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, body = reshape_error(pending["status"], b"".join(chunks))
            headers = [
                (name, value)
                for name, value in pending.get("headers", [])
                if name.lower() not in (b"content-length", b"content-type")
            ]
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({**pending, "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            pending = None

        await self.app(scope, receive, shaped_send)


class FieldError(Exception):
    """A domain error and the request field it is about (OpenAI's ``param``)."""

    def __init__(self, error: ClipError, param: str) -> None:
        super().__init__(error.message)
        self.error, self.param = error, param


@contextmanager
def about(param: str) -> Iterator[None]:
    """Client errors raised inside are about ``param``; overload and not-ready are not."""
    try:
        yield
    except ClipError as error:
        if http_status(error) >= HTTPStatus.INTERNAL_SERVER_ERROR:
            raise
        raise FieldError(error, param) from error


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def _error_answer(error: ClipError, param: str | None, kwargs: dict[str, Any]) -> Response:
    model = kwargs.get("model")
    record_error(model if isinstance(model, str) else None, error.code)
    status = openai_status(http_status(error), error.code)
    logger.warning("%s %s (request %s): %s", status, error.code, CURRENT_REQUEST_ID.get(), error)
    ctx = kwargs["ctx"]
    if isinstance(ctx, bentoml.Context):
        ctx.response.status_code = status  # BentoML answers with the context's status
    body = openai_error_body(status, error.code, error.message, param, CURRENT_REQUEST_ID.get())
    return JSONResponse(body, status_code=status)


def openai_errors(
    handler: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Awaitable[R | Response]]:
    """``clip_service.http_errors.api_errors`` for the OpenAI routes: a ``ClipError`` becomes
    OpenAI's envelope at the status its clients expect, counted under the requested model (the
    request id middleware adds the request id)."""

    @functools.wraps(handler)
    async def endpoint(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R | Response:
        try:
            return await handler(self, *args, **kwargs)
        except FieldError as caught:
            return _error_answer(caught.error, caught.param, kwargs)
        except ClipError as error:
            return _error_answer(error, None, kwargs)

    return endpoint


# -- POST /v1/embeddings -------------------------------------------------------------------


def input_items(value: str | list[Any]) -> list[TextItem | ImageItem]:
    """The request's ``input`` as items in order; token arrays are refused, saying why."""
    if isinstance(value, str):
        return [TextItem(text=value)]
    if not value:
        raise E.InvalidRequestError("input is empty")
    if any(isinstance(item, int | list) for item in value):
        raise E.InvalidRequestError(
            "input: token arrays are not accepted; send the texts (the ids come from the "
            "client's tokenizer, and each model here has its own). LangChain's "
            "OpenAIEmbeddings sends them unless check_embedding_ctx_length=False"
        )
    return [TextItem(text=item) if isinstance(item, str) else item for item in value]


def encode_embedding(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype(BASE64_DTYPE).tobytes()).decode("ascii")
    return vector.tolist()


def check_dimensions(dimensions: int | None, model_dimensions: int) -> None:
    if dimensions is not None and dimensions != model_dimensions:
        raise E.InvalidRequestError(
            f"dimensions={dimensions}: this model's embeddings have {model_dimensions} "
            "dimensions and cannot be shortened (CLIP is not trained for truncated, "
            "Matryoshka-style embeddings); omit dimensions or send "
            f"{model_dimensions}"
        )


class OpenAIEmbeddings:
    """Mixin of the front end's service class: the ``/v1/embeddings`` API. It uses the front
    end's job builder (``jobs``), its preprocessing (model entries) and its one way to the model
    (``_embed``), so both doors make the same model calls."""

    if TYPE_CHECKING:
        settings: ClipSettings
        preprocessing: Preprocessing

        @property
        def jobs(self) -> JobBuilder: ...

        async def _embed(
            self, name: str, jobs: list[Job], field: str
        ) -> tuple[list[np.ndarray], list[JobOutcome]]: ...

    async def _openai_jobs(self, name: str, items: list[TextItem | ImageItem]) -> list[Job]:
        """One job per item, in order; the first bad item fails the request, naming its index."""
        builder = self.jobs
        builder.check_count(len(items), INPUT_FIELD)

        async def job(item: TextItem | ImageItem) -> Job:
            if isinstance(item, ImageItem):
                return await builder.image_job(name, item.image)
            return await builder.text_job(name, item.text)

        return await gathered_jobs([job(item) for item in items], INPUT_FIELD)

    @bentoml.api(route=EMBEDDINGS_ROUTE)
    @openai_errors
    async def create_embeddings(
        self,
        input: EmbeddingInput,
        model: ServedModelName,
        ctx: bentoml.Context,
        encoding_format: EncodingFormat = "float",
        dimensions: Dimensions = None,
        user: str | None = None,  # OpenAI's end-user id: accepted, not used
    ) -> EmbeddingList:
        """OpenAI's embeddings API: L2-normalized embeddings of texts and images (the same
        vectors as /evaluator/v1/embeddings/*), in input order; `usage` counts the texts' tokens
        as the model's own tokenizer makes them (images count 0)."""
        with about("model"):
            name = resolve_model_name(self.settings, model)
        with about(INPUT_FIELD):
            items = input_items(input)
            jobs = await self._openai_jobs(name, items)
            vectors, outcomes = await self._embed(name, jobs, INPUT_FIELD)
        with about("dimensions"):
            check_dimensions(dimensions, len(vectors[0]))
        tokens = sum(outcome.text_tokens for outcome in outcomes)  # images count 0
        return EmbeddingList(
            data=[
                Embedding(index=index, embedding=encode_embedding(vector, encoding_format))
                for index, vector in enumerate(vectors)
            ],
            model=name,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )


# -- GET /v1/models ---------------------------------------------------------------------------


def _card(service: Any, name: str) -> ModelCard:
    entry = service.preprocessing.entries[name]
    saved = type(service).__dict__[store_attribute(name)].stored
    return ModelCard(
        id=name,
        created=int(saved.creation_time.timestamp()),
        owned_by=entry.pretrained or entry.weights,
    )


async def list_models(request: Request) -> Response:
    service = bentoml.get_current_service()
    listed = ModelList(data=[_card(service, name) for name in service.settings.models])
    return JSONResponse(listed.model_dump(mode="json"))


async def retrieve_model(request: Request) -> Response:
    service = bentoml.get_current_service()
    try:
        name = resolve_model_name(service.settings, request.path_params["model"])
    except E.UnknownModelError as error:
        status = openai_status(http_status(error), error.code)
        body = openai_error_body(
            status, error.code, error.message, "model", CURRENT_REQUEST_ID.get()
        )
        return JSONResponse(body, status_code=status)
    return JSONResponse(_card(service, name).model_dump(mode="json"))


openai_routes = Starlette(
    routes=[
        Route(MODELS_ROUTE, list_models, methods=["GET"]),
        Route(MODELS_ROUTE + "/{model}", retrieve_model, methods=["GET"]),
    ]
)


def openai_route_paths(models: list[str]) -> frozenset[str]:
    """The plain routes' paths, for the request metrics' bounded path labels."""
    listing = OPENAI_PATH + MODELS_ROUTE
    return frozenset({listing} | {f"{listing}/{name}" for name in models})


def _ref(model: type) -> dict[str, str]:
    return {"$ref": OPENAPI_REF_TEMPLATE.format(model=model.__name__)}


def _get_operation(name: str, description: str, answer: type, **extra: Any) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref(answer)}}
    failure = {"application/json": {"schema": _ref(ErrorResponse)}}
    return {
        "get": {
            "tags": ["Service APIs"],
            "operationId": f"openai__{name}",
            "description": description,
            "responses": {
                "200": {"description": "Successful Response", "content": content},
                "401": {"description": "a valid API key is required", "content": failure},
                **extra.pop("responses", {}),
            },
            **extra,
        }
    }


def mount_openai_routes(service: Any) -> None:
    """Mount the plain ``/v1`` routes beside the APIs and describe them in the service's
    OpenAPI document (BentoML documents only its own APIs and mounted FastAPI apps)."""
    service.mount_asgi_app(openai_routes, path=OPENAI_PATH)
    listing = OPENAI_PATH + MODELS_ROUTE
    not_served = {"description": "the model is not served", "content": {}}
    paths = {
        listing: _get_operation("list_models", "The served models, in OpenAI's shape.", ModelList),
        listing + "/{model}": _get_operation(
            "retrieve_model",
            "One served model, in OpenAI's shape.",
            ModelCard,
            parameters=[
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            responses={"404": not_served},
        ),
    }
    document_plain_routes(service, paths, [ModelList, ModelCard, ErrorResponse])
