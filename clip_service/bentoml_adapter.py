"""Every reach into BentoML's private API (and its server's, uvicorn), in one place (BentoML is
pinned to 1.4.40 for it).

- ``setup_tracing``: BentoML's tracer-provider slot (``BentoMLContainer``) gets an OTLP/HTTP
  exporter when only the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, and a missing
  exporter is reported instead of crash-looping the workers while they hold the port.
- ``bound_request_metric_paths``: BentoML's request metrics labelled by known routes only.
- ``metrics_text``: the multiprocess-aggregated Prometheus text of BentoML's ``/metrics``.
- ``bound_graceful_shutdown``: the worker's uvicorn server gets a drain bound on SIGTERM.
  BentoML 1.4.40 has no service option for it (``ServiceConfig`` in
  ``_bentoml_sdk/service/config.py`` has no shutdown key; only ``bentoml serve
  --timeout-graceful-shutdown`` sets it), and without it uvicorn waits for a stuck request for
  ever. Set from the service itself, every way of serving (``bentoml serve TAG``, the image,
  Kubernetes) gets it.
- ``gpu_count``, ``accelerator_resources``: the model worker's ``resources``, from NVIDIA GPUs as
  BentoML's resource allocator counts them (NVML).
- ``forbid_unknown_fields``: the input models BentoML builds from each API's signature refuse
  fields they do not have (pydantic ignores them by default: a misspelt ``caption`` was dropped
  silently). ``bentoml.api(input_spec=...)`` would need each signature written twice.

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

import logging
import os
from collections.abc import Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from clip_service.observability import TRACING_EXCLUDED_URLS, UNKNOWN_PATH

logger = logging.getLogger("clip_service.bentoml_adapter")

# What this module uses of BentoML's private API: (module, attribute path).
PRIVATE_API: tuple[tuple[str, str], ...] = (
    ("bentoml._internal.configuration.containers", "BentoMLContainer.tracer_provider"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.tracing_excluded_urls"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.config"),
    ("bentoml._internal.configuration.containers", "BentoMLContainer.metrics_client"),
    ("bentoml._internal.server.http.instruments", "RunnerTrafficMetricsMiddleware"),
    ("bentoml._internal.resource", "system_resources"),
    ("uvicorn.server", "Server.handle_exit"),
    ("uvicorn.server", "Server.shutdown"),
)


def metrics_text() -> tuple[bytes, str]:
    """BentoML's Prometheus exposition (every worker's multiprocess files summed) and its
    content type: the same text as BentoML's own ``/metrics``. Blocking: call it in a thread."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    client = BentoMLContainer.metrics_client.get()
    return client.generate_latest(), client.CONTENT_TYPE_LATEST


def forbid_unknown_fields(apis: Iterable[Any]) -> None:
    """Each API's generated input model (``input_spec``) gets ``extra="forbid"``, rebuilt."""
    for api in apis:
        spec = api.input_spec
        spec.model_config = {**spec.model_config, "extra": "forbid"}
        spec.model_rebuild(force=True)


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

    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetricsMiddleware
