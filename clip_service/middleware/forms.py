"""Forms are checked whole before BentoML parses them: an upload route takes a form only, and a
form only the parts its route declares (``clip_service.multipart_guard``)."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_service.middleware.answers import header, send_error
from clip_service.multipart_guard import MultipartRefused, check_form, is_multipart

# An upload route takes a form only: BentoML would download any other body's text as a URL.
SEND_FORM = "send the file as multipart/form-data (curl -F image=@photo.jpg -F text=...)"


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The body, and whether it is complete (False: the client left before its end)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the already-read body, then the client's later messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class FormGuardMiddleware:
    """Under ``prefix`` (except ``own_paths``): 415 for a POST to an upload route that is not
    multipart/form-data; 400 naming the part for a form that ``check_form`` refuses. A form is
    read through the body guards outside this one, so their limits hold while it is read, and
    one that leaves mid-form is answered by ``ClientLeftMiddleware``.

    ``file_fields``: route -> form fields that must be file parts (``file_fields_by_route``).
    ``input_fields``: route -> its fields (``input_fields_by_route``), named in the message."""

    def __init__(
        self,
        app: ASGIApp,
        file_fields: Mapping[str, frozenset[str]],
        input_fields: Mapping[str, tuple[str, ...]],
        prefix: str | tuple[str, ...] = "/evaluator/",
        own_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.file_fields = file_fields
        self.input_fields = input_fields
        self.prefix = prefix
        self.own_paths = own_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefix) or path in self.own_paths:
            await self.app(scope, receive, send)
            return
        content_type = header(scope, b"content-type") or b""
        file_fields = self.file_fields.get(path, frozenset())
        if file_fields and scope["method"] == "POST" and not is_multipart(content_type):
            # Other methods get the router's 405.
            status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
            await send_error(send, scope, status, "unsupported_media_type", SEND_FORM)
            return
        if not is_multipart(content_type):
            await self.app(scope, receive, send)
            return
        body, complete = await read_body(receive)
        if not complete:
            return  # nobody to answer; the client-left guard records the 499
        try:
            check_form(content_type, body, file_fields, self.input_fields.get(path))
        except MultipartRefused as refused:
            await send_error(send, scope, HTTPStatus.BAD_REQUEST, "invalid_request", str(refused))
            return
        await self.app(scope, replay(body, receive), send)
