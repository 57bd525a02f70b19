"""Metrics, traces and structured logs of the BentoML services.

Metrics: one set per process (``service_metrics``), created after BentoML has set
PROMETHEUS_MULTIPROC_DIR, so every worker writes its own files and ``/metrics`` sums them.
Spans: per request stage, and one per model batch linked to the requests it served. How tracing
is switched on inside BentoML lives in ``bentoml_adapter``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from clip_runtime.settings import get_settings

if TYPE_CHECKING:
    from clip_runtime.model import BatchReport, ClipModel

logger = logging.getLogger("clip_service.observability")
tracer = trace.get_tracer("clip_service")
_propagator = TraceContextTextMapPropagator()

# Probes and scrapes would drown the traces that matter (patterns are searched in the full URL).
TRACING_EXCLUDED_URLS = (
    r"/(livez|readyz|healthz|metrics)(\?.*)?$",
    r"/evaluator/(health|metrics)(\?.*)?$",
)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNKNOWN_PATH = "/{unknown}"


@dataclass(frozen=True)
class ServiceMetrics:
    pairs: Any
    errors: Any
    stage_seconds: Any
    queue_wait_seconds: Any
    batches: Any
    batch_items: Any
    text_cache: Any
    model_info: Any
    gpu_memory_bytes: Any


@lru_cache(maxsize=1)
def service_metrics() -> ServiceMetrics:
    """The project's metrics, once per process (both services may share one in tests/dev)."""
    import prometheus_client as p  # after BentoML set the multiprocess directory

    return ServiceMetrics(
        pairs=p.Counter("clip_pairs", "Image-text pairs answered", ["model", "outcome"]),
        errors=p.Counter("clip_errors", "Errors answered, by code", ["code"]),
        stage_seconds=p.Histogram(
            "clip_stage_seconds",
            "Time per pipeline stage: fetch and decode per pair (front end); encode_image, "
            "encode_text (tokenize included) and score per model batch (model worker)",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
        ),
        queue_wait_seconds=p.Histogram(
            "clip_queue_wait_seconds",
            "Time from the front end handing a pair to the model worker until its model batch "
            "starts",
            ["model"],
            buckets=STAGE_BUCKETS,
        ),
        batches=p.Counter("clip_model_batches", "Model forward batches run", ["model"]),
        batch_items=p.Histogram(
            "clip_model_batch_items",
            "Image-text pairs per model batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        ),
        text_cache=p.Counter(
            "clip_text_cache", "Text embedding cache lookups", ["model", "result"]
        ),
        # "max": the one model worker process sets 1; files of a restarted worker must not add up.
        model_info=p.Gauge(
            "clip_model_info",
            "Served model (value 1): architecture, pretrained tag, weights, device, dtype",
            ["model", "architecture", "pretrained", "weights", "device", "dtype"],
            multiprocess_mode="max",
        ),
        # "mostrecent": the latest reading wins, whichever process file holds it.
        gpu_memory_bytes=p.Gauge(
            "clip_gpu_memory_bytes",
            "CUDA memory of the model worker (allocated: tensors; reserved: the caching allocator)",
            ["device", "kind"],
            multiprocess_mode="mostrecent",
        ),
    )


def record_error(model: str | None, code: str) -> None:
    """An error answered. A requested name that is not served is client input: one label
    ("unknown") for all of them, so that scanning model names adds no series."""
    settings = get_settings()
    name = model or settings.default_model
    metrics = service_metrics()
    metrics.errors.labels(code).inc()
    metrics.pairs.labels(name if name in settings.models else "unknown", "error").inc()


def record_pairs_scored(model: str, count: int = 1) -> None:
    service_metrics().pairs.labels(model, "ok").inc(count)


def record_gpu_memory(device: Any) -> None:
    """Set the GPU memory gauges (CUDA only: other devices have no series at all)."""
    if getattr(device, "type", None) != "cuda":
        return
    import torch

    gauge = service_metrics().gpu_memory_bytes
    gauge.labels(str(device), "allocated").set(torch.cuda.memory_allocated(device))
    gauge.labels(str(device), "reserved").set(torch.cuda.memory_reserved(device))


@contextmanager
def stage(model: str, name: str, **attributes: Any) -> Iterator[None]:
    """A child span and a stage-duration observation for one step of a request."""
    started = time.perf_counter()
    with tracer.start_as_current_span(
        f"clip.{name}", attributes={"clip.model": model, **attributes}
    ):
        try:
            yield
        finally:
            service_metrics().stage_seconds.labels(model, name).observe(
                time.perf_counter() - started
            )


def current_traceparent() -> str:
    """The W3C traceparent of the current span ('' when not tracing): rides along with a pair
    so that the model batch span can link to the request it served."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def batch_span(model: str, traceparents: list[str], start_ns: int) -> trace.Span:
    """The span of one model batch: a root (it serves many requests, so it has no one parent)
    linked to the request spans of the pairs in it."""
    links = []
    for traceparent in dict.fromkeys(traceparents):
        if not traceparent:
            continue
        span_context = trace.get_current_span(
            _propagator.extract({"traceparent": traceparent})
        ).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
    return tracer.start_span(
        "clip.model_batch",
        context=otel_context.Context(),
        links=links,
        start_time=start_ns,
        attributes={"clip.model": model, "clip.batch.items": len(traceparents)},
    )


def stage_spans(parent: trace.Span, model: str, start_ns: int, stages: dict[str, float]) -> None:
    """Child spans of a batch laid end to end from the engine's per-stage timings (the engine
    stays free of tracing; it reports durations, in the order it runs the stages)."""
    context = trace.set_span_in_context(parent)
    cursor = start_ns
    for name, seconds in stages.items():
        end = cursor + int(seconds * 1e9)
        span = tracer.start_span(
            f"clip.{name}", context=context, start_time=cursor, attributes={"clip.model": model}
        )
        span.end(end_time=end)
        cursor = end


class BatchObservation:
    """Metrics and the span of one model batch (model worker side): queue wait when it starts, stage
    durations, size and cache counts from the engine's report when it finishes."""

    def __init__(self, model: str, handoffs: list[tuple[float, str]], device: Any) -> None:
        """``handoffs``: (wall-clock time the front end sent the pair, its traceparent)."""
        self.model, self.device, self.metrics = model, device, service_metrics()
        self.start_ns = time.time_ns()
        for sent_at, _ in handoffs:
            if sent_at:
                wait = max(self.start_ns / 1e9 - sent_at, 0.0)
                self.metrics.queue_wait_seconds.labels(model).observe(wait)
        self.span = batch_span(model, [traceparent for _, traceparent in handoffs], self.start_ns)

    def __enter__(self) -> BatchObservation:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        if error is not None:  # a failed batch still ends its span, marked as an error
            self.span.record_exception(error)
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        self.span.end()

    def finish(self, report: BatchReport) -> None:
        m, model = self.metrics, self.model
        stages = {
            "encode_image": report.encode_image_s,
            "encode_text": report.encode_text_s,
            "score": report.score_s,
        }
        stage_spans(self.span, model, self.start_ns, stages)
        self.span.set_attribute("clip.text_cache.hits", report.text_cache_hits)
        self.span.set_attribute("clip.text_cache.misses", report.text_cache_misses)
        for name, seconds in stages.items():
            m.stage_seconds.labels(model, name).observe(seconds)
        m.batches.labels(model).inc()
        m.batch_items.labels(model).observe(report.items)
        m.text_cache.labels(model, "hit").inc(report.text_cache_hits)
        m.text_cache.labels(model, "miss").inc(report.text_cache_misses)
        record_gpu_memory(self.device)


def record_model_info(models: Iterable[ClipModel]) -> None:
    gauge = service_metrics().model_info
    for model in models:
        info = model.info
        labels = (info.architecture, info.pretrained or "", info.weights)
        gauge.labels(info.name, *labels, info.device, info.dtype).set(1)
        record_gpu_memory(model.device)


# -- logs ---------------------------------------------------------------------------------------

# C0 and C1 controls, DEL and the Unicode line and paragraph separators: anything a log reader
# could take for the end of a line (or a terminal for a command).
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Loggers whose handlers every record passes through (BentoML's config: root and "bentoml").
_HANDLER_LOGGERS = ("", "bentoml", "bentoml.access")


def escape_control_characters(text: str) -> str:
    """``text`` with each control character written as its Python escape (``\\r``, ``\\x1b``)."""
    return _CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape_control_characters(value)
    if isinstance(value, bytes | bytearray):
        return escape_control_characters(bytes(value).decode("latin-1"))
    return value


class EscapeClientValues(logging.Filter):
    """Escapes control characters in a record's arguments, where client values go (a path, a
    method, a model name): a ``%0d%0a`` in a URL cannot start a forged log line. The format
    string is the program's own and is left alone, as is a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _escaped(value) for key, value in record.args.items()}
        return True


def escape_logged_client_values() -> None:
    """Put ``EscapeClientValues`` on every handler BentoML installed (idempotent), so that it
    covers our loggers, BentoML's access log and its API error log alike."""
    loggers = [logging.getLogger(name) for name in _HANDLER_LOGGERS]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, EscapeClientValues) for f in handler.filters):
            handler.addFilter(EscapeClientValues())


class _TraceIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else ""
        record.span_id = format(span_context.span_id, "016x") if span_context.is_valid else ""
        return True


def configure_logging(log_format: str) -> None:
    """JSON lines with the trace id on every handler BentoML installed (``text`` keeps
    BentoML's format, which already carries ``trace=...`` while a span is active); client values
    escaped in either."""
    escape_logged_client_values()
    if log_format != "json":
        return
    from pythonjsonlogger.json import JsonFormatter

    formatter = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
        rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
    )
    loggers = [logging.getLogger(), *map(logging.getLogger, ("bentoml", "bentoml.access"))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        handler.addFilter(_TraceIds())
        handler.setFormatter(formatter)
