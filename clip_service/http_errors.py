"""From a domain error to an HTTP answer, in one place: the status table, the error envelope, and
the one wrapper every endpoint goes through.

Handlers raise ``ClipError``s and return their declared types; ``api_errors`` counts the error,
sets the status and writes the envelope (the request id is added by ``RequestIdMiddleware``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any, Concatenate, ParamSpec, TypeVar

import bentoml
from starlette.responses import JSONResponse, Response

from clip_runtime import errors as E
from clip_runtime.errors import ClipError
from clip_service.observability import record_error

logger = logging.getLogger("clip_service.http_errors")

# The id of the request being handled (set by RequestIdMiddleware), so that every log line
# about an error answer carries the id the answer shows.
CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("clip_request_id", default=None)

CLIENT_CLOSED_REQUEST = 499  # nginx's; nobody reads it: it shows in access logs and metrics


class ClientGoneError(ClipError):
    """The client disconnected before its pairs reached a model batch."""

    code = "client_closed_request"

    def __init__(self, message: str = "client closed the request") -> None:
        super().__init__(message)


# The one table from domain error to HTTP status (codes are the errors' own ``code``).
ERROR_STATUS: dict[type[ClipError], int] = {
    E.InvalidRequestError: HTTPStatus.BAD_REQUEST,
    E.InvalidImageError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UnsupportedImageFormatError: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    E.ImageTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.ImageDimensionsTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.ImageTooSmallError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.ImageAspectRatioError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.ImageTooManyScansError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.EmptyTextError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.InvalidTextError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.TextTooLongError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.TooManyItemsError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.RequestTooLargeError: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    E.UnknownModelError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UrlNotAllowedError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.InvalidUrlError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UrlFetchFailedError: HTTPStatus.UNPROCESSABLE_ENTITY,
    E.UnauthorizedError: HTTPStatus.UNAUTHORIZED,
    E.ModelNotReadyError: HTTPStatus.SERVICE_UNAVAILABLE,
    E.OverloadedError: HTTPStatus.SERVICE_UNAVAILABLE,
    ClientGoneError: CLIENT_CLOSED_REQUEST,
}


def http_status(error: ClipError) -> int:
    """The status for ``error``; an error the table does not name is a bug: 500."""
    return int(ERROR_STATUS.get(type(error), HTTPStatus.INTERNAL_SERVER_ERROR))


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """The error envelope: ``{"error": {"code", "message", "request_id"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def api_errors(
    handler: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Awaitable[R | Response]]:
    """Wrap an endpoint that takes ``ctx`` (and optionally ``model``) as keyword arguments, as
    BentoML passes them: a ``ClipError`` it raises becomes the error envelope with its status,
    counted under the requested model. BentoML returns a ``Response`` as it is, and overwrites
    its status with the context's when the API takes a context, so both are set."""

    @functools.wraps(handler)
    async def endpoint(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R | Response:
        try:
            return await handler(self, *args, **kwargs)
        except ClipError as error:
            model = kwargs.get("model")
            record_error(model if isinstance(model, str) else None, error.code)
            status = http_status(error)
            level = logging.INFO if status == CLIENT_CLOSED_REQUEST else logging.WARNING
            logger.log(
                level,
                "%s %s (request %s): %s",
                status,
                error.code,
                CURRENT_REQUEST_ID.get(),
                error.message,
            )
            ctx = kwargs["ctx"]
            if isinstance(ctx, bentoml.Context):
                ctx.response.status_code = status
            return JSONResponse(error_body(error.code, error.message), status_code=status)

    return endpoint
