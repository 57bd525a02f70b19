"""The front end's BentoML service (`clip-evaluator`), put together from the settings and the
model store: the handlers (``clip_service.front_end``) with their model worker dependency
(``clip_service.scorer``), the plain routes mounted beside them, the OpenAI routes, the OpenAPI
document, the middleware stack and the model store references. Importing this module reads the
settings and checks the store; the modules it puts together do neither. ``service.py`` imports
``Evaluator`` from here, so ``bentoml serve service:Evaluator`` serves it.

``bentoml.service`` is called at module level on purpose: BentoML 1.4.40 finds a service again
(``Service.import_string``, used to start its worker processes) among the module-level variables
of the module that created it. Class attributes (the dependency, the store references) are set
before it, since it collects them from the class when it is called."""

from __future__ import annotations

import functools

import bentoml
from starlette.routing import Route

from clip_runtime import get_settings
from clip_runtime.model_entry import embed_dim
from clip_service.bento_image import BENTO_IMAGE
from clip_service.bentoml_adapter import document_openapi, forbid_unknown_fields
from clip_service.front_end import FrontEnd
from clip_service.middleware import middleware_stack
from clip_service.middleware.error_envelope import input_fields_by_route
from clip_service.multipart_guard import file_fields_by_route
from clip_service.openai_api import mount_openai_routes, openai_route_paths
from clip_service.openapi import service_document
from clip_service.routes import EVALUATOR_PATH, HEALTH_ROUTE, evaluator_routes
from clip_service.scorer import Scorer
from clip_service.store import add_store_references, stored_folders

settings = get_settings()

FrontEnd.model_worker = bentoml.depends(Scorer)
add_store_references(FrontEnd, settings)
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
)(bentoml.asgi_app(evaluator_routes, path=EVALUATOR_PATH)(FrontEnd))
mount_openai_routes(Evaluator)  # GET /v1/models, and its place in the OpenAPI document
forbid_unknown_fields(Evaluator.apis.values())


@functools.cache
def embedding_sizes() -> dict[str, int]:
    """Each served model's embedding size, read once, when the OpenAPI document is first asked
    for (not at import)."""
    return {name: embed_dim(folder) for name, folder in stored_folders(FrontEnd, settings).items()}


document_openapi(Evaluator, lambda spec: service_document(spec, settings, embedding_sizes()))
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
