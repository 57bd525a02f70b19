"""Guards on the request body as the app reads it: its size, its deadline, and a client that
leaves before sending all of it. None buffers the body; each passes it on as it arrives.

A guard refuses a body from inside ``receive``: BentoML turns the exception into a 500 (or lets
it escape), so the guard that refused replaces whatever the app answers with its own refusal.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.http_errors import CLIENT_CLOSED_REQUEST
from clip_service.middleware.answers import header, send_error


class BodyRefused(Exception):
    """A body a guard stops reading: too large, arriving too slowly, or abandoned."""

    def __init__(self, status: int, code: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.close = status, code, message, close


class Refusal:
    """One request's refusal by one guard, and whether it has been answered."""

    def __init__(self) -> None:
        self.refused: BodyRefused | None = None
        self.answered = False

    def refuse(self, refused: BodyRefused) -> BodyRefused:
        self.refused = refused
        return refused


def body_size(message: Message) -> int:
    return len(message.get("body", b""))


def ends_body(message: Message) -> bool:
    """After this message no more of the body comes (it was the last part, or a disconnect)."""
    return message["type"] != "http.request" or not message.get("more_body", False)


class BodyGuardMiddleware(ABC):
    """A guard that watches ``receive`` (``watched``) and, once it refused the body, answers
    the refusal instead of the app. Refusals of other guards pass through it untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @abstractmethod
    def watched(self, receive: Receive, refusal: Refusal) -> Receive:
        """``receive`` as the app sees it: it records (and may raise) this guard's refusal."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = Refusal()

        async def send_or_refuse(message: Message) -> None:
            if refusal.refused is None:
                await send(message)
                return
            if not refusal.answered and message["type"] == "http.response.start":
                await answer(send, scope, refusal.refused)
            refusal.answered = True

        try:
            await self.app(scope, self.watched(receive, refusal), send_or_refuse)
        except BodyRefused as refused:
            if refused is not refusal.refused:
                raise
        if refusal.refused is not None and not refusal.answered:
            # The app let the refusal escape, or stopped reading without answering.
            refusal.answered = True
            await answer(send, scope, refusal.refused)


async def answer(send: Send, scope: Scope, refused: BodyRefused) -> None:
    # An unread body leaves the connection unusable: "connection: close" makes h11 end it.
    close = [(b"connection", b"close")] if refused.close else []
    await send_error(send, scope, refused.status, refused.code, refused.message, close)


def content_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


class BodySizeLimitMiddleware(BodyGuardMiddleware):
    """413 for a body over ``max_request_bytes``: at once when Content-Length says so, else as
    soon as the bytes received pass it (a chunked body)."""

    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        super().__init__(app)
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = content_length(scope) if scope["type"] == "http" else None
        if declared is not None and declared > self.max_request_bytes:
            await send_error(
                send,
                scope,
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "request_too_large",
                f"request body has {declared} bytes; at most {self.max_request_bytes} are accepted",
            )
            return
        await super().__call__(scope, receive, send)

    def watched(self, receive: Receive, refusal: Refusal) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += body_size(message)
            if received > self.max_request_bytes:
                raise refusal.refuse(
                    BodyRefused(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        "request_too_large",
                        f"request body exceeds {self.max_request_bytes} bytes",
                    )
                )
            return message

        return counted


@dataclass(frozen=True)
class BodyDeadline:
    """When a request body must be complete: ``timeout_s`` after its headers, plus one second
    for every ``min_rate_bytes_s`` bytes received (Apache mod_reqtimeout's ``body=,MinRate=``):
    a large body at any usable rate goes through, a trickle is cut after about ``timeout_s``."""

    timeout_s: float
    min_rate_bytes_s: int

    def at(self, started: float, received: int) -> float:
        """The loop time by which the next part of the body must arrive."""
        return started + self.timeout_s + received / self.min_rate_bytes_s


class BodyDeadlineMiddleware(BodyGuardMiddleware):
    """408 with the connection closed for a body not complete by its ``BodyDeadline``; once the
    body is complete, the app's wait for the disconnect has no deadline."""

    def __init__(self, app: ASGIApp, deadline: BodyDeadline) -> None:
        super().__init__(app)
        self.deadline = deadline

    def watched(self, receive: Receive, refusal: Refusal) -> Receive:
        loop = asyncio.get_running_loop()
        started, received, complete = loop.time(), 0, False

        async def timed() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(self.deadline.at(started, received)):
                    message = await receive()
            except TimeoutError:
                took_s = loop.time() - started
                raise refusal.refuse(
                    BodyRefused(
                        HTTPStatus.REQUEST_TIMEOUT,
                        "request_timeout",
                        f"request body too slow: {received} bytes in {took_s:.0f} s",
                        close=True,
                    )
                ) from None
            received += body_size(message)
            complete = ends_body(message)
            return message

        return timed


class ClientLeftMiddleware(BodyGuardMiddleware):
    """499 ``client_closed_request`` (logged at INFO: not a server error) for a client that
    closes the connection before its body is complete. The app still sees the disconnect."""

    def watched(self, receive: Receive, refusal: Refusal) -> Receive:
        received, complete = 0, False

        async def noticed() -> Message:
            nonlocal received, complete
            if complete:  # later receives wait for the disconnect: that is no early leave
                return await receive()
            message = await receive()
            if message["type"] != "http.request":
                refusal.refuse(
                    BodyRefused(
                        CLIENT_CLOSED_REQUEST,
                        "client_closed_request",
                        f"the client closed the connection after {received} bytes of its body",
                    )
                )
            received += body_size(message)
            complete = ends_body(message)
            return message

        return noticed
