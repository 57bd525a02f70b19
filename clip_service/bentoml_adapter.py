"""Every reach into BentoML's private API (and, through it, uvicorn's), in one place (BentoML is
pinned to 1.4.40 for it).

- ``setup_tracing``: BentoML's tracer-provider slot (``BentoMLContainer``) gets an OTLP/HTTP
  exporter when only the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and a missing
  exporter is reported instead of crash-looping the workers while they hold the port.
- ``bound_request_metric_paths``: BentoML's request metrics labelled by known routes only.
- ``metrics_text``: the multiprocess-aggregated Prometheus text of BentoML's ``/metrics``.
- ``limit_header_time``: uvicorn's HTTP/1.1 protocol with a deadline for request headers.
  BentoML starts uvicorn itself and passes no ``http=`` option, and neither uvicorn nor h11 has
  a header timeout (the keep-alive timer only starts after a response), so a client sending
  headers a byte at a time would hold a connection for as long as it likes.
- ``install_bentoml_fixes``: the dependency client to the model worker keeps in-flight calls
  alive across its session refreshes and reports an unreachable worker as not ready, and circus
  restarts a dead worker within a second (details at "The model worker's client" below), and
  the model worker's socket outlives the HTTP workers' drain (``install_cleanup_after_workers``);
  ``call_with_reconnect`` retries an idempotent model call once on a dropped connection.
- ``bound_graceful_shutdown``: the worker's uvicorn server gets a drain bound on SIGTERM.
  BentoML 1.4.40 has no service option for it (``ServiceConfig`` in
  ``_bentoml_sdk/service/config.py`` has no shutdown key; only ``bentoml serve
  --timeout-graceful-shutdown`` sets it), and without it uvicorn waits for a stuck request for
  ever. Set from the service itself, every way of serving (``bentoml serve TAG``, the image,
  Kubernetes) gets it.
- ``gpu_count``, ``accelerator_resources``: the model worker's ``resources``, from NVIDIA GPUs as
  BentoML's resource allocator counts them (NVML).
- ``install_plain_text_forms``: BentoML's form deserialiser (``_bentoml_impl/serde.py``,
  ``MultipartSerde.parse_request``) runs ``json.loads`` on every text value, so a caption
  ``123`` became a number (a 400), ``"hi"`` was scored as ``hi``, and 100,000 ``[`` raised
  ``RecursionError`` (a 500); and it downloads a text value sent for a file field as a URL,
  outside our fetch policy. The replacement keeps a value as text for string fields, parses JSON
  only for other fields (a parse failure is a 400 naming the field), and never downloads.
  BentoML's own generated client JSON-encodes every form part (and says so in User-Agent): its
  parts are read as JSON, so its uploads keep working.
- ``forbid_unknown_fields``: the input models BentoML builds from each API's signature refuse
  fields they do not have (pydantic ignores them by default: a misspelt ``caption`` was dropped
  silently), naming at most ``MAX_NAMED_UNKNOWN_FIELDS`` of them (pydantic's own ``forbid``
  builds an error per key, so the work and the answer grow with the body; docs/reliability.md).
  ``bentoml.api(input_spec=...)`` would need each signature written twice.
- ``document_openapi``: the service's OpenAPI document (``/docs.json``, the Bento's
  ``apis/openapi.yaml``) is BentoML's, rewritten by the service (``clip_service/openapi.py``).
  BentoML 1.4.40 builds it in ``Service.openapi_spec`` with its own title, version ("None"),
  error bodies and no nullable fields, and has no option to change any of it.
- ``document_plain_routes``: plain Starlette routes mounted beside the APIs get a place in the
  service's OpenAPI document (``/docs.json``); BentoML 1.4.40 describes only its own APIs and
  mounted FastAPI apps (``_bentoml_sdk/service/openapi.py``: ``generate_spec``).

Why ``setup_tracing`` is ours and not BentoML's ``tracing`` configuration: in 1.4.40 that
configuration turns export on only through ``BENTOML_CONFIG``/``BENTOML_CONFIG_OPTIONS``
(``tracing.exporter_type=otlp`` plus ``tracing.otlp.protocol``; ``OTEL_EXPORTER_OTLP_ENDPOINT``
alone does nothing), samples with its own ``tracing.sample_rate`` (default 0: no spans) instead of
``OTEL_TRACES_SAMPLER``, and a missing exporter package raises ImportError in every worker at app
build, which crash-loops them while they hold the port. When that configuration is set, it wins.

``tests/test_bentoml_adapter.py`` checks that each private name used here still exists, so a
BentoML upgrade fails there first, loudly, rather than in production.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, cast

import aiohttp
import bentoml
import h11
from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import BaseModel

from clip_service.multipart_guard import takes_text
from clip_service.observability import TRACING_EXCLUDED_URLS, UNKNOWN_PATH
from clip_service.schemas import refuse_unknown_fields

logger = logging.getLogger("clip_service.bentoml_adapter")

# What this module uses of BentoML's private API: (module, attribute path).
PRIVATE_API: tuple[tuple[str, str], ...] = (
    ("bentoml._internal.configuration.containers", "BentoMLContainer.tracer_provider"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.tracing_excluded_urls"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.config"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.metrics_client"),
    ("bentoml._internal.server.http.instruments", "RunnerTrafficMetricsMiddleware"),
    ("uvicorn.protocols.http.auto", "AutoHTTPProtocol"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.connection_made"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.connection_lost"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.data_received"),
    ("bentoml._internal.resource", "system_resources"),
    ("uvicorn.server", "Server.handle_exit"),
    ("uvicorn.server", "Server.shutdown"),
    ("_bentoml_impl.client.proxy2", "SessionManager.get_session"),
    ("_bentoml_impl.client.proxy2", "SessionManager._should_refresh"),
    ("_bentoml_impl.client.proxy2", "SessionManager._make_client"),
    ("_bentoml_impl.client.proxy2", "AsyncClient.is_ready"),
    ("bentoml._internal.utils.circus", "Arbiter.start"),
    ("bentoml._internal.utils.circus", "Arbiter.stop"),
    ("circus.arbiter", "Arbiter.stop"),
    ("circus.arbiter", "Arbiter.stop_controller_and_close_sockets"),
    ("circus.controller", "Controller.start"),
    ("_bentoml_sdk.service.factory", "Service.openapi_spec"),
    ("bentoml._internal.service.openapi.specification", "OpenAPISpecification"),
    ("bentoml._internal.utils.cattr", "bentoml_cattr"),
    ("_bentoml_impl.serde", "ALL_SERDE"),
    ("_bentoml_impl.serde", "MultipartSerde.parse_request"),
    ("_bentoml_sdk.service.openapi", "generate_spec"),
    ("_bentoml_sdk.service.openapi", "REF_TEMPLATE"),
    ("bentoml._internal.service.openapi.specification", "PathItem"),
    ("bentoml._internal.service.openapi.specification", "Schema"),
)

# What a client too slow with its headers is told before the connection is closed.
_TIMEOUT_BODY = b'{"error": {"code": "request_timeout", "message": "headers took too long"}}'
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + b"content-length: %d\r\n\r\n" % len(_TIMEOUT_BODY)
    + _TIMEOUT_BODY
)


def metrics_text() -> tuple[bytes, str]:
    """BentoML's Prometheus exposition (every worker's multiprocess files summed) and its
    content type: the same text as BentoML's own ``/metrics``. Blocking: call it in a thread."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    client = BentoMLContainer.metrics_client.get()
    return client.generate_latest(), client.CONTENT_TYPE_LATEST


def forbid_unknown_fields(apis: Iterable[Any]) -> None:
    """Each API's generated input model (``input_spec``) gets ``extra="forbid"``, rebuilt, and
    is replaced by a subclass that refuses unknown fields before pydantic does, naming a bounded
    number of them (``refuse_unknown_fields``): pydantic builds one error per unknown key."""
    from pydantic import create_model, model_validator

    for api in apis:
        spec = api.input_spec
        spec.model_config = {**spec.model_config, "extra": "forbid"}
        spec.model_rebuild(force=True)
        bounded = model_validator(mode="before")(_refuse_unknown_fields)
        api.input_spec = create_model(
            spec.__name__,
            __base__=spec,
            __module__=spec.__module__,
            # pydantic annotates __validators__ as plain callables, though its documented values
            # are model_validator's descriptors (`__namespace__`, typed Any, needs 2.14).
            __validators__={"_bounded_unknown_fields": bounded},  # type: ignore[dict-item]
        )


def _refuse_unknown_fields(cls: type[BaseModel], data: Any) -> Any:
    # pydantic makes a before-validator whose first parameter is named `cls` a classmethod.
    return refuse_unknown_fields(cls, data)


FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_PLAIN_TEXT_MARK = "_clip_plain_text_forms"


# BentoML's generated client (``_bentoml_impl/client/http.py``, ``_build_multipart``) sends every
# non-file form part as ``json.dumps(value)`` and names itself in User-Agent: its parts are JSON.
BENTOML_CLIENT_AGENT = "BentoML HTTP Client/"


async def _form_value(name: str, value: Any, annotation: Any, json_parts: bool) -> Any:
    """A form part's value for a field of type ``annotation``: the text itself for a string
    field (unless ``json_parts``: BentoML's client encoded it), else the JSON it holds; a 400
    (``InvalidArgument``) naming the field otherwise."""
    from bentoml.exceptions import InvalidArgument

    if not isinstance(value, str):  # a file part sent for a non-file field
        raw = await value.read()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"form field {name!r} is not UTF-8 text") from None
    if takes_text(annotation) and not json_parts:
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise InvalidArgument(f"form field {name!r} is not valid JSON") from None


async def _parse_form(self: Any, request: Any, cls: Any) -> Any:
    """BentoML's ``MultipartSerde.parse_request`` with text kept as text and no downloads."""
    from bentoml.exceptions import InvalidArgument

    form = await request.form()
    json_parts = request.headers.get("user-agent", "").startswith(BENTOML_CLIENT_AGENT)
    data: dict[str, Any] = {}
    for name in form:
        if name in cls.multipart_fields:
            files = form.getlist(name)
            if any(isinstance(value, str) for value in files):
                raise InvalidArgument(f"form field {name!r} must be a file upload")
            data[name] = files if _takes_many(cls.model_fields[name].annotation) else files[0]
        elif name in cls.model_fields:
            annotation = cls.model_fields[name].annotation
            data[name] = await _form_value(name, form[name], annotation, json_parts)
        else:
            data[name] = form[name]  # refused by the model (extra="forbid")
    return cls.model_validate(data)


def _takes_many(annotation: Any) -> bool:
    """``list[Path]`` or an optional one: every file sent under the name, as BentoML does."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_many(arg) for arg in typing.get_args(annotation))
    return typing.get_origin(annotation) is list


def install_plain_text_forms() -> None:
    """Give BentoML's form deserialiser our ``parse_request`` (idempotent; raises if BentoML
    changed). Takes effect in every process that imports the service module."""
    from _bentoml_impl import serde

    base = serde.MultipartSerde
    if base.__dict__.get(_PLAIN_TEXT_MARK, False):
        return
    require_patched_version(bentoml.__version__, "plain-text form patch")
    if any(serde.ALL_SERDE.get(media_type) is not base for media_type in FORM_MEDIA_TYPES):
        raise BentoMLChangedError("BentoML no longer parses forms with MultipartSerde")
    base._clip_unfixed_parse_request = base.parse_request
    base.parse_request = _parse_form
    setattr(base, _PLAIN_TEXT_MARK, True)


def document_openapi(
    service: bentoml.Service[Any], rewrite: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """``service.openapi_spec`` becomes ``rewrite`` of the document BentoML generates: what
    ``/docs.json`` serves and ``bentoml build`` writes. The service's class is swapped for a
    subclass (its attrs slots leave no instance attribute to set)."""
    from bentoml._internal.service.openapi.specification import OpenAPISpecification
    from bentoml._internal.utils.cattr import bentoml_cattr

    base = type(service)
    generated = base.openapi_spec.fget

    # A class made from a runtime value, which mypy cannot check as a base.
    class DocumentedService(base):  # type: ignore[valid-type,misc]
        __slots__ = ()

        @property
        def openapi_spec(self) -> OpenAPISpecification:
            document = rewrite(generated(self).asdict())
            return bentoml_cattr.structure(document, OpenAPISpecification)

    service.__class__ = DocumentedService


# Where BentoML's OpenAPI document keeps its schemas (``_bentoml_sdk.service.openapi``).
OPENAPI_REF_TEMPLATE = "#/components/schemas/{model}"
# Service name -> (path items, pydantic models their schemas refer to).
_PLAIN_ROUTE_DOCS: dict[str, tuple[dict[str, dict[str, Any]], list[type[Any]]]] = {}
_DOCUMENTS_PLAIN_ROUTES = "_clip_documents_plain_routes"


def document_plain_routes(
    service: Any, paths: dict[str, dict[str, Any]], models: list[type[Any]]
) -> None:
    """Add ``paths`` (OpenAPI path items, referring to ``models``' schemas through
    ``OPENAPI_REF_TEMPLATE``) to ``service``'s OpenAPI document, wherever BentoML generates it
    (``/docs.json``, ``bentoml build``). Raises if BentoML's generator is not the one expected."""
    from _bentoml_sdk.service import openapi

    if openapi.REF_TEMPLATE != OPENAPI_REF_TEMPLATE:
        raise BentoMLChangedError(f"BentoML's OpenAPI schemas moved to {openapi.REF_TEMPLATE}")
    _PLAIN_ROUTE_DOCS[service.name] = (paths, models)
    if getattr(openapi.generate_spec, _DOCUMENTS_PLAIN_ROUTES, False):
        return
    bentoml_generate_spec = openapi.generate_spec

    def generate_spec(svc: Any, **options: Any) -> Any:
        spec = bentoml_generate_spec(svc, **options)
        if svc.name in _PLAIN_ROUTE_DOCS:
            _add_plain_routes(spec, *_PLAIN_ROUTE_DOCS[svc.name])
        return spec

    setattr(generate_spec, _DOCUMENTS_PLAIN_ROUTES, True)
    openapi.generate_spec = generate_spec  # Service.openapi_spec imports it at each call


def _add_plain_routes(spec: Any, paths: dict[str, dict[str, Any]], models: list[type[Any]]) -> None:
    from bentoml._internal.service.openapi.specification import PathItem, Schema
    from bentoml._internal.utils.cattr import bentoml_cattr

    schemas = spec.components["schemas"]
    for model in models:
        schema = model.model_json_schema(ref_template=OPENAPI_REF_TEMPLATE)
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, Schema(**definition))
        schemas.setdefault(model.__name__, Schema(**schema))
    for path, item in paths.items():
        spec.paths[path] = bentoml_cattr.structure(item, PathItem)


def gpu_count() -> int:
    """NVIDIA GPUs visible to this host (0 without NVML or a driver), as BentoML counts them."""
    from bentoml._internal.resource import system_resources

    return len(system_resources()["nvidia.com/gpu"])


def accelerator_resources(device: str, gpus: int) -> dict[str, int]:
    """``resources`` for the model worker: one GPU when it will serve on one, else none.

    BentoML 1.4.40 then pins the worker to one GPU (``CUDA_VISIBLE_DEVICES``) unless
    ``CUDA_VISIBLE_DEVICES`` or ``BENTOML_DISABLE_GPU_ALLOCATION`` is already set. It does not
    refuse to start without GPUs, but warns that "serving may fail" and sets
    ``CUDA_VISIBLE_DEVICES=0`` anyway, so the GPU is declared only where one is seen. ``cuda:N``
    is left alone: renumbering the visible devices would break the operator's index.
    """
    if device in ("auto", "cuda") and gpus > 0:
        return {"gpu": 1}
    return {}


def bound_graceful_shutdown(timeout_s: float) -> bool:
    """Bound this worker's drain on SIGTERM to ``timeout_s``: requests still running then are
    cancelled (uvicorn's ``timeout_graceful_shutdown``). A bound given on the command line
    (``--timeout-graceful-shutdown``) is kept. Call from the main thread once uvicorn's signal
    handlers are installed (a service's ``__init__`` runs in the server's lifespan, after that);
    False when no uvicorn server is found (e.g. the service built outside a server)."""
    import signal
    import threading

    from uvicorn.server import Server

    if threading.current_thread() is not threading.main_thread():
        return False
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(server, Server):
        return False
    if server.config.timeout_graceful_shutdown is None:
        server.config.timeout_graceful_shutdown = int(timeout_s)
    logger.info("drain on SIGTERM bounded to %ss", server.config.timeout_graceful_shutdown)
    return True


def setup_tracing() -> bool:
    """Install the tracer provider BentoML's middleware and our spans use; True when tracing.

    BentoML's own ``tracing`` config wins when set. Otherwise the standard OTEL_EXPORTER_OTLP_*
    variables turn on OTLP/HTTP export; the SDK reads the endpoint, headers, OTEL_TRACES_SAMPLER
    and OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES itself. Runs at service import; exporters
    are imported here so that a missing one is reported once, clearly, and never crashes.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from opentelemetry.util.http import ExcludeList
    from simple_di import providers

    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    configured = BentoMLContainer.config.tracing.exporter_type.get()
    if configured:
        try:
            provider = BentoMLContainer.tracer_provider.get()
        except ImportError as error:
            logger.error(
                "TRACING DISABLED: BentoML tracing.exporter_type=%s but its exporter cannot be "
                "imported (%s). Serving without tracing.",
                configured,
                error,
            )
            BentoMLContainer.tracer_provider.set(TracerProvider(sampler=ALWAYS_OFF))
            return False
        trace.set_tracer_provider(provider)
    elif endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as error:
            logger.error(
                "TRACING DISABLED: OTEL_EXPORTER_OTLP_ENDPOINT=%s is set but the OTLP/HTTP "
                "exporter cannot be imported (%s); install "
                "opentelemetry-exporter-otlp-proto-http==1.45.1. Serving without tracing.",
                endpoint,
                error,
            )
            return False

        def build() -> TracerProvider:
            # Called when BentoML builds the app, once the worker knows which service it runs.
            from bentoml import server_context
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            name = server_context.service_name or "clip-score"
            attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: name}
            provider = TracerProvider(resource=Resource.create(attributes))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
            return provider

        BentoMLContainer.tracer_provider = providers.SingletonFactory(build)
    else:
        return False
    if not BentoMLContainer.config.tracing.excluded_urls.get():
        BentoMLContainer.tracing_excluded_urls.set(ExcludeList(list(TRACING_EXCLUDED_URLS)))
    logger.info("tracing on (%s)", configured or f"otlp/http to {endpoint}")
    return True


def bound_request_metric_paths(known_paths: set[str]) -> None:
    """Label BentoML's request metrics with the path only for routes the service has (and give
    each request a fresh trace context, see below).

    BentoML 1.4.40 (pinned) labels them with the raw request path, so every scanned URL would
    add series forever. Its middleware class is looked up when each app is built, so replacing
    it here (service import, before the app exists) takes effect in every worker.
    """
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "bounded_paths", False):
        return

    class _RestorePath:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if "clip.path" in scope:
                scope = {**scope, "path": scope["clip.path"]}
            await self.app(scope, receive, send)

    # A subclass of whatever class BentoML holds there (a runtime value, unchecked as a base).
    class BoundedTrafficMetricsMiddleware(base):  # type: ignore[misc, valid-type]
        bounded_paths = True

        def __init__(self, app: Any, **options: Any) -> None:
            super().__init__(_RestorePath(app), **options)

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            path = scope.get("path", "")
            if scope["type"] == "http" and path not in known_paths and path != "/metrics":
                scope = {**scope, "path": UNKNOWN_PATH, "clip.path": path}
            # Outermost middleware: start each request from an empty trace context. Uvicorn runs
            # a keep-alive connection's next request in a context copied from the previous one,
            # whose server span would otherwise become the new request's parent.
            token = otel_context.attach(otel_context.Context())
            try:
                await super().__call__(scope, receive, send)
            finally:
                otel_context.detach(token)

    # The patch itself: BentoML builds its metrics middleware from this module attribute.
    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetricsMiddleware  # type: ignore[misc,assignment]


# -- The model worker's client (and its restart) ---------------------------------------------
#
# Why: in BentoML 1.4.40 the client behind ``bentoml.depends(Scorer)``
# (``_bentoml_impl.client.proxy2.SessionManager``) replaces its aiohttp session after every
# ``max_requests`` (100) calls or ``max_age`` (300 s) and *awaits ``close()`` on the old one while
# other calls are still running on it*: those calls fail with ``ServerDisconnectedError``
# (BentoML issue #5540; the proposed fix, PR #5698, is not merged). Under any concurrency above one,
# a burst of model calls failed every 100 calls.
#
# ``install_dependency_session_fix()`` keeps BentoML's refresh policy but retires the old session
# instead of closing it under its callers: it is closed once every call that could be using it
# has ended — after the session's own total timeout, which bounds every request made on it (or
# when the client itself is closed). ``call_with_reconnect`` retries an idempotent model call once
# when the connection itself failed (a kept-alive connection the worker had just closed, a worker
# restart): the second attempt gets a fresh connection.
#
# ``install_dependency_session_fix()`` also replaces the client's ``is_ready``: BentoML's catches
# only ``ServerTimeoutError``, so a total timeout or a refused or dropped connection to a dead
# worker escaped from the front end's ``/readyz`` handler before any answer was sent, and BentoML's
# ``TimeoutMiddleware`` then held the probe open until the traffic timeout (600 s here) instead
# of answering 503. The replacement answers "not ready" for any connection failure or timeout.
#
# ``install_fast_worker_restart()``: BentoML starts its circus arbiter with ``check_delay=10``, the
# period at which circus notices a dead worker and starts another one (circus has no SIGCHLD
# handler), so a crashed model worker stayed dead for up to 10 s before its restart even began.
# It sets that period to ``WORKER_CHECK_DELAY_S`` in the ``bentoml serve`` process.

T = TypeVar("T")

# The BentoML release whose SessionManager this module was written against and tested with.
PATCHED_BENTOML_VERSION = "1.4.40"
# What the replacement methods use of BentoML's SessionManager.
REQUIRED_METHODS = ("get_session", "close", "_make_client", "_should_refresh")
REQUIRED_INIT_STATE = ("_session", "_created_at", "_request_count", "_timeout")
# What the replacement is_ready uses of BentoML's AsyncClient.
REQUIRED_CLIENT_STATE = ("_session_manager", "_readyz_endpoint")
_MARK = "_clip_retires_old_sessions"


class BentoMLChangedError(RuntimeError):
    """BentoML no longer looks like what a patch here was written for."""


def require_patched_version(version: str, patch: str, advice: str = "") -> None:
    """Raise unless ``version`` is the BentoML every patch here was written for."""
    if version != PATCHED_BENTOML_VERSION:
        raise BentoMLChangedError(
            f"bentoml {version} is installed; the {patch} in {__name__} was written for "
            f"{PATCHED_BENTOML_VERSION}{advice}"
        )


def _session_manager_class() -> type[Any]:
    from _bentoml_impl.client import proxy2

    return cast(type[Any], proxy2.SessionManager)


def _async_client_class() -> type[Any]:
    from _bentoml_impl.client import proxy2

    return cast(type[Any], proxy2.AsyncClient)


def check_async_client(client_class: type[Any]) -> None:
    """Raise unless ``client_class`` has what the replacement ``is_ready`` uses."""
    if not callable(getattr(client_class, "is_ready", None)):
        raise BentoMLChangedError(f"{client_class.__qualname__} has no is_ready()")
    probe = client_class("http://127.0.0.1:1", server_ready_timeout=0)
    missing = [name for name in REQUIRED_CLIENT_STATE if not hasattr(probe, name)]
    temp_dir = getattr(probe, "_temp_dir", None)  # the client makes one at construction
    if temp_dir is not None:
        temp_dir.cleanup()
    if missing:
        raise BentoMLChangedError(
            f"{client_class.__qualname__} lacks {', '.join(missing)}: the readiness fix in "
            f"{__name__} no longer fits this BentoML"
        )


async def _is_ready(self: Any, timeout: int | None = None) -> bool:
    """BentoML's ``AsyncClient.is_ready``, False on any connection failure or timeout."""
    session = await self._session_manager.get_session()
    limit = aiohttp.ClientTimeout(total=timeout) if timeout else None
    try:
        async with session.get(self._readyz_endpoint, timeout=limit) as response:
            return response.status == 200
    except (TimeoutError, aiohttp.ClientError) as error:
        logger.info("model worker not ready: %r", error)
        return False


def check_session_manager(manager_class: type[Any], version: str) -> None:
    """Raise unless ``manager_class`` is the SessionManager this adapter was written for."""
    require_patched_version(
        version,
        "dependency session fix",
        ": check whether SessionManager still closes sessions under in-flight calls, then "
        "update or drop the fix",
    )
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(manager_class, m, None))]
    probe = manager_class(url="http://127.0.0.1:1", timeout=1.0, headers={})
    missing += [name for name in REQUIRED_INIT_STATE if not hasattr(probe, name)]
    if missing:
        raise BentoMLChangedError(
            f"{manager_class.__qualname__} lacks {', '.join(missing)}: the dependency session fix "
            f"in {__name__} no longer fits this BentoML"
        )


async def _get_session(self: Any) -> aiohttp.ClientSession:
    """BentoML's ``get_session`` with the old session retired instead of closed."""
    if self._session is None or self._should_refresh():
        if self._session is not None:
            _retire(self, self._session)
        self._session = self._make_client()
        self._created_at = time.monotonic()  # BentoML's own clock for max_age
        self._request_count = 0
    self._request_count += 1
    return cast(aiohttp.ClientSession, self._session)


def _retire(self: Any, session: aiohttp.ClientSession) -> None:
    """Close ``session`` once no call can still be using it: after its total timeout."""
    retired: set[aiohttp.ClientSession] = self.__dict__.setdefault("_clip_retired", set())
    closers: set[asyncio.Task[None]] = self.__dict__.setdefault("_clip_closers", set())
    retired.add(session)
    closer = asyncio.create_task(_close_when_unused(retired, session))
    closers.add(closer)
    closer.add_done_callback(closers.discard)


async def _close_when_unused(
    retired: set[aiohttp.ClientSession], session: aiohttp.ClientSession
) -> None:
    await asyncio.sleep(session.timeout.total or 0.0)
    if session in retired:
        retired.discard(session)
        await session.close()


async def _close(self: Any) -> None:
    """BentoML's ``close``, plus the retired sessions (the client is going away)."""
    for closer in self.__dict__.get("_clip_closers", set()).copy():
        closer.cancel()
    retired: set[aiohttp.ClientSession] = self.__dict__.get("_clip_retired", set())
    while retired:
        await retired.pop().close()
    if self._session is not None:
        await self._session.close()
        self._session = None


def apply_session_fix(manager_class: type[Any]) -> None:
    """Give ``manager_class`` (BentoML's SessionManager or a subclass) the retiring methods."""
    if manager_class.__dict__.get(_MARK, False):
        return
    check_session_manager(manager_class, bentoml.__version__)
    # BentoML's own methods, kept for the test that shows the failure they cause.
    manager_class._clip_unfixed_methods = {
        "get_session": manager_class.get_session,
        "close": manager_class.close,
    }
    manager_class.get_session = _get_session
    manager_class.close = _close
    setattr(manager_class, _MARK, True)


def apply_readiness_fix(client_class: type[Any]) -> None:
    """Give ``client_class`` (BentoML's AsyncClient or a subclass) the replacement is_ready."""
    if client_class.__dict__.get(_MARK, False):
        return
    check_async_client(client_class)
    client_class._clip_unfixed_methods = {"is_ready": client_class.is_ready}
    client_class.is_ready = _is_ready
    setattr(client_class, _MARK, True)


def install_dependency_session_fix() -> None:
    """Patch BentoML's dependency SessionManager and the client's is_ready (idempotent; raises
    if BentoML changed).

    Patching the class's methods covers clients created before and after this call, in every
    process that imports the service module (the Evaluator builds its Scorer client lazily, on
    the first ``self.model_worker`` access, long after import).
    """
    apply_session_fix(_session_manager_class())
    apply_readiness_fix(_async_client_class())


async def call_with_reconnect(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, once more if the connection failed. Only for idempotent calls.

    Connection-level failures (``ServerDisconnectedError``, refused or reset connections) are
    retried; a timeout is not (the call already took the whole budget), nor is any answer.
    """
    try:
        return await call()
    except aiohttp.ServerTimeoutError:
        raise
    except aiohttp.ClientConnectionError as error:
        logger.info("model worker connection failed (%r); retrying once", error)
        return await call()


WORKER_CHECK_DELAY_S = 1.0
_FAST_RESTART_MARK = "_clip_fast_worker_restart"


def check_arbiter(arbiter_class: type[Any], controller_class: type[Any], version: str) -> None:
    """Raise unless BentoML's arbiter and circus's controller are what the patch expects."""
    require_patched_version(version, "worker restart patch")
    if "check_delay" not in inspect.signature(controller_class.__init__).parameters:
        raise BentoMLChangedError(f"{controller_class.__qualname__} takes no check_delay")
    if not callable(arbiter_class.__dict__.get("start")):
        raise BentoMLChangedError(f"{arbiter_class.__qualname__} no longer defines start()")


def install_fast_worker_restart() -> None:
    """Make circus check its workers every ``WORKER_CHECK_DELAY_S`` (idempotent; raises if
    BentoML or circus changed). Takes effect in ``bentoml serve``, which imports the service
    before it starts the arbiter."""
    from bentoml._internal.utils import circus as bentoml_circus
    from circus.controller import Controller

    arbiter_class = bentoml_circus.Arbiter
    if arbiter_class.__dict__.get(_FAST_RESTART_MARK, False):
        return
    check_arbiter(arbiter_class, Controller, bentoml.__version__)
    bentoml_start = arbiter_class.start

    def start(self: Any, cb: Callable[[Any], Any] | None = None) -> None:
        # The controller keeps milliseconds and starts its periodic check in start().
        self.ctrl.check_delay = min(self.ctrl.check_delay, WORKER_CHECK_DELAY_S * 1000)
        bentoml_start(self, cb)

    arbiter_class.start = start  # type: ignore[method-assign]  # the patch itself
    setattr(arbiter_class, _FAST_RESTART_MARK, True)


BENTOML_STOP_ATTRIBUTE = "_clip_bentoml_stop"  # BentoML's own stop, kept once patched


def install_cleanup_after_workers() -> None:
    """Make BentoML's arbiter delete the folder of its unix sockets after its workers have
    stopped, not before (idempotent).

    BentoML 1.4.40's ``Arbiter.stop`` runs its exit stack, which deletes that folder
    (``_bentoml_impl/server/serving.py``: ``exit_stack.callback(shutil.rmtree, uds_path)``),
    and only then asks circus to stop the workers. The model worker keeps listening on its
    socket while the HTTP workers drain, but once the file is gone, a drained request that needs
    a new connection to it fails ("Cannot connect to unix socket ... No such file"): a 503 for
    work accepted before the SIGTERM. Here the exit stack runs where circus closes its own
    sockets, once every worker has exited (the end of ``start()``, or a loop callback after
    ``stop()``)."""
    from bentoml._internal.utils import circus as bentoml_circus
    from circus.arbiter import Arbiter as CircusArbiter

    arbiter_class = bentoml_circus.Arbiter
    if BENTOML_STOP_ATTRIBUTE in arbiter_class.__dict__:
        return
    require_patched_version(bentoml.__version__, "socket cleanup patch")
    closing = "stop_controller_and_close_sockets"
    for owner, name in ((arbiter_class, "stop"), (CircusArbiter, closing)):
        if not callable(owner.__dict__.get(name)):
            raise BentoMLChangedError(f"{owner.__module__}.{owner.__qualname__}.{name} is gone")
    bentoml_stop = arbiter_class.stop

    def stop(self: Any) -> Any:
        return CircusArbiter.stop(self)  # BentoML's stop less its early exit stack

    def stop_controller_and_close_sockets(self: Any) -> None:
        CircusArbiter.stop_controller_and_close_sockets(self)
        self.exit_stack.__exit__(None, None, None)  # an exited ExitStack is empty: idempotent

    arbiter_class.stop = stop  # type: ignore[method-assign]  # the patch itself
    arbiter_class.stop_controller_and_close_sockets = stop_controller_and_close_sockets
    setattr(arbiter_class, BENTOML_STOP_ATTRIBUTE, bentoml_stop)


def install_bentoml_fixes() -> None:
    """Every patch; call once at import of the service module (every process imports it)."""
    install_dependency_session_fix()
    install_fast_worker_restart()
    install_cleanup_after_workers()
    install_plain_text_forms()


def limit_header_time(timeout_s: float) -> None:
    """Make every uvicorn worker started after this call close connections whose request
    headers are not complete ``timeout_s`` after the connection opened (or after the first
    byte of the next request on a kept-alive connection), with a 408.

    BentoML 1.4.40 builds ``uvicorn.Config`` with the default ``http="auto"``, which uvicorn
    resolves through ``uvicorn.protocols.http.auto.AutoHTTPProtocol`` when the worker starts
    (after the service module is imported): replacing it here swaps the protocol. It is always
    h11 (httptools, if installed, would have the same gap and is not what this was tested with).
    """
    from uvicorn.protocols.http import auto
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        header_timeout_s = timeout_s

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_deadline: asyncio.TimerHandle | None = None
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(
                    self.header_timeout_s, self._headers_too_slow
                )

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm_header_deadline()  # a new request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_header_deadline()  # the headers are in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            # Armed only while no request is in progress, so no response is half-written.
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(REQUEST_TIMEOUT_RESPONSE)
                self.transport.close()

    auto.AutoHTTPProtocol = HeaderTimeoutH11Protocol
