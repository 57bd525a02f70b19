"""The front end's middleware stack around any ASGI app: the guards tested without a server."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp

from clip_runtime.settings import ClipSettings
from clip_service.middleware import middleware_stack, wrap


def guarded(
    app: ASGIApp,
    file_fields: Mapping[str, frozenset[str]] | None = None,
    input_fields: Mapping[str, tuple[str, ...]] | None = None,
    own_error_bodies: frozenset[str] = frozenset(),
    **settings: Any,
) -> ASGIApp:
    """``app`` inside every middleware the front end adds, with ``ClipSettings(**settings)``."""
    layers = middleware_stack(
        ClipSettings(**settings), file_fields or {}, input_fields or {}, own_error_bodies
    )
    return wrap(app, layers)
