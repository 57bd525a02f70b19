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

``tests/test_bentoml_adapter.py`` checks that each private name used here still exists, so a
BentoML upgrade fails there first, loudly, rather than in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import h11
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
    ("uvicorn.protocols.http.auto", "AutoHTTPProtocol"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.connection_made"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.connection_lost"),
    ("uvicorn.protocols.http.h11_impl", "H11Protocol.data_received"),
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
