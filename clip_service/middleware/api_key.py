"""Bearer API keys: with keys configured, the APIs (and, on request, the documentation) need one."""

from __future__ import annotations

import hmac
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from clip_service.middleware.answers import header, send_error

# API documentation pages: open, or behind the API key with CLIP_AUTH_DOCS=protected.
DOC_PATHS = ("/", "/docs.json", "/schema.json", "/evaluator/docs", "/evaluator/demo")


def bearer_token(scope: Scope) -> bytes | None:
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return None


def authorization_count(scope: Scope) -> int:
    return sum(name == b"authorization" for name, _ in scope.get("headers", []))


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant-time per key, and every key is compared, so timing says nothing of which."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token or b"", key)
    return matched and token is not None


class ApiKeyMiddleware:
    """401 without a valid ``Authorization: Bearer <key>`` on paths under ``prefix`` (except
    ``open_paths``), and on ``DOC_PATHS`` when ``protect_docs``; 400 for two Authorization
    headers. Without ``api_keys`` every request passes. Before any body is read."""

    def __init__(
        self,
        app: ASGIApp,
        api_keys: tuple[str, ...] = (),
        open_paths: tuple[str, ...] = (),
        prefix: str | tuple[str, ...] = "/evaluator/",
        protect_docs: bool = False,
    ) -> None:
        self.app = app
        self.api_keys = tuple(key.encode() for key in api_keys)
        self.open_paths = frozenset(path.rstrip("/") or "/" for path in open_paths)
        self.prefixes = (prefix,) if isinstance(prefix, str) else prefix
        self.protect_docs = protect_docs

    def needs_key(self, path: str) -> bool:
        if not self.api_keys:
            return False
        normalized = path.rstrip("/") or "/"
        if normalized in DOC_PATHS:
            return self.protect_docs
        protected = normalized.startswith(tuple(p.rstrip("/") for p in self.prefixes))
        return protected and normalized not in self.open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.needs_key(scope["path"]):
            await self.app(scope, receive, send)
        elif authorization_count(scope) > 1:
            # Proxies and frameworks disagree on which of two headers counts: refuse both.
            message = "send one Authorization header only"
            await send_error(send, scope, HTTPStatus.BAD_REQUEST, "invalid_request", message)
        elif not key_matches(bearer_token(scope), self.api_keys):
            # Keys are never logged; only the fact of a refusal is (in send_error).
            await send_error(
                send,
                scope,
                HTTPStatus.UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required",
                [(b"www-authenticate", b'Bearer realm="clip"')],
            )
        else:
            await self.app(scope, receive, send)
