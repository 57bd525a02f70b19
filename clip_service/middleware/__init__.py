"""The HTTP front end's ASGI middlewares, one per concern, and the one list that composes them.

``middleware_stack`` is that list, outermost first; ``clip_service.evaluator`` adds it to the
service in order, and ``wrap`` builds the same onion around any ASGI app (for tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp

from clip_runtime.settings import ClipSettings
from clip_service.admission import InFlightLimitMiddleware
from clip_service.framing import AmbiguousLengthMiddleware
from clip_service.middleware.api_key import ApiKeyMiddleware
from clip_service.middleware.body import (
    BodyDeadline,
    BodyDeadlineMiddleware,
    BodySizeLimitMiddleware,
    ClientLeftMiddleware,
)
from clip_service.middleware.error_envelope import ErrorEnvelopeMiddleware
from clip_service.middleware.forms import FormGuardMiddleware
from clip_service.middleware.request_id import RequestIdMiddleware
from clip_service.openai_api import OPENAI_PATH, OpenAIErrorShapeMiddleware

# A middleware class and the keyword arguments it is built with (BentoML's add_asgi_middleware).
Layer = tuple[type[Any], dict[str, Any]]

# The front end's APIs and routes (its own and the OpenAI-compatible door): keys are checked
# and errors get the envelope there (reshaped for OpenAI's clients under /v1/).
API_PREFIXES = ("/evaluator/", OPENAI_PATH + "/")
SCORING_PREFIXES = ("/evaluator/v1/", OPENAI_PATH + "/")  # the in-flight limit counts these


def middleware_stack(
    settings: ClipSettings,
    file_fields: Mapping[str, frozenset[str]],
    input_fields: Mapping[str, tuple[str, ...]],
    own_error_bodies: frozenset[str] = frozenset(),
) -> list[Layer]:
    """Every middleware of the front end, outermost (first to see a request) first.

    ``file_fields``: route -> form fields that must be files (``file_fields_by_route``).
    ``input_fields``: route -> its fields (``input_fields_by_route``), named in messages.
    ``own_error_bodies``: paths whose error answers are their own document (health's 503)."""
    return [
        # First: no other answer (a 401, a 413) may leave such a connection open.
        (AmbiguousLengthMiddleware, {}),
        # Next, so every answer below, each refusal included, carries the id.
        (RequestIdMiddleware, {}),
        # Outside the envelope: every error answer under /v1/, in OpenAI's shape and status.
        (OpenAIErrorShapeMiddleware, {"prefix": OPENAI_PATH + "/"}),
        # Outside every layer that answers an error, so it sees each one.
        (
            ErrorEnvelopeMiddleware,
            {
                "prefix": API_PREFIXES,
                "own_error_bodies": own_error_bodies,
                "retry_after_s": settings.retry_after_s,
                "input_fields": input_fields,
                "upload_routes": frozenset(route for route, f in file_fields.items() if f),
            },
        ),
        # Before any body is read.
        (
            ApiKeyMiddleware,
            {
                "api_keys": tuple(settings.api_keys),
                "open_paths": tuple(settings.auth_open_paths),
                "prefix": API_PREFIXES,
                "protect_docs": settings.auth_docs == "protected",
            },
        ),
        # The body guards: outside the form check, which reads the body through them.
        (BodySizeLimitMiddleware, {"max_request_bytes": settings.max_request_bytes}),
        (
            BodyDeadlineMiddleware,
            {"deadline": BodyDeadline(settings.body_timeout_s, settings.body_min_rate_bytes_s)},
        ),
        (ClientLeftMiddleware, {}),
        (
            FormGuardMiddleware,
            {
                "file_fields": file_fields,
                "input_fields": input_fields,
                "prefix": API_PREFIXES,
                "own_paths": own_error_bodies,
            },
        ),
        # Innermost: a request it sheds has passed every check and carries the id.
        (
            InFlightLimitMiddleware,
            {
                "limit": settings.max_in_flight,
                "retry_after_s": settings.retry_after_s,
                "prefix": SCORING_PREFIXES,
            },
        ),
    ]


def wrap(app: ASGIApp, layers: list[Layer]) -> ASGIApp:
    """``app`` inside ``layers``, the first outermost, as BentoML (Starlette) builds them."""
    for middleware, options in reversed(layers):
        app = middleware(app, **options)
    return app
