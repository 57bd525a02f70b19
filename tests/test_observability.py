"""Tracing set-up in a fresh interpreter (it changes BentoML's process-wide container): the
standard OTEL_* variables alone, BentoML's own tracing config, and a missing exporter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import prometheus_client
import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clip_runtime.model import BatchReport
from clip_service import observability
from tests.integration.test_tracing import SHIM

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from clip_service import bentoml_adapter
from bentoml._internal.configuration.containers import BentoMLContainer as C
on = bentoml_adapter.setup_tracing()
print("ON" if on else "OFF")
provider = C.tracer_provider.get()
print("SAMPLER", provider.sampler.get_description())
excluded = C.tracing_excluded_urls.get()
for path in ("/readyz", "/livez", "/metrics", "/evaluator/health", "/evaluator/metrics",
             "/evaluator/v1/evaluation/single"):
    print("EXCLUDED" if excluded.url_disabled("http://h:3000" + path) else "TRACED", path)
"""


def probe(env: dict[str, str], tmp_path: Path | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BENTOML_CONFIG"))}
    if tmp_path is not None:
        (tmp_path / "sitecustomize.py").write_text(SHIM)
        clean["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_endpoint_alone_turns_tracing_on_and_sampler_env_is_honoured() -> None:
    out = probe(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }
    )
    assert "ON" in out.splitlines()
    assert "SAMPLER ParentBased{root:TraceIdRatioBased{0.25}" in out
    for path in ("/readyz", "/livez", "/metrics", "/evaluator/health", "/evaluator/metrics"):
        assert f"EXCLUDED {path}\n" in out
    assert "TRACED /evaluator/v1/evaluation/single" in out


def test_no_endpoint_no_tracing() -> None:
    assert "OFF" in probe({}).splitlines()


def test_bentoml_tracing_config_with_missing_exporter_does_not_crash(tmp_path: Path) -> None:
    options = (
        "tracing.exporter_type=otlp tracing.sample_rate=1.0 tracing.otlp.protocol=http "
        "tracing.otlp.endpoint=http://127.0.0.1:9/v1/traces"
    )
    out = probe({"BENTOML_CONFIG_OPTIONS": options}, tmp_path)
    assert "OFF" in out.splitlines()
    assert "TRACING DISABLED: BentoML tracing.exporter_type=otlp" in out
    assert "SAMPLER AlwaysOffSampler" in out
    # Without the shim, the same BentoML config traces (so the shim is what disabled it).
    out = probe({"BENTOML_CONFIG_OPTIONS": options})
    assert "ON" in out.splitlines() and "TraceIdRatioBased{1.0}" in out


def test_missing_otlp_exporter_is_reported(tmp_path: Path) -> None:
    out = probe({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    assert "OFF" in out.splitlines()
    assert "TRACING DISABLED: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:9" in out


def test_batch_observation_spans_and_metrics() -> None:
    """The batch span links the requests it served, has stage children with the engine's
    durations, and ends marked as an error when the batch fails; queue wait is observed."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider
    with observability.tracer.start_as_current_span("clip.model_call") as call:
        traceparent = observability.current_traceparent()
    sample = ("clip_queue_wait_seconds_sum", {"model": "ViT-B-32"})
    waited = prometheus_client.REGISTRY.get_sample_value(*sample) or 0.0
    handoffs = [(time.time() - 0.5, traceparent), (0.0, "")]  # the second: not traced, not timed
    with observability.BatchObservation("ViT-B-32", handoffs, torch.device("cpu")) as batch:
        report = BatchReport(items=2, text_cache_hits=1, text_cache_misses=1)
        report.encode_image_s, report.encode_text_s, report.score_s = 0.25, 0.125, 0.0625
        batch.finish(report)
    assert 0.5 <= prometheus_client.REGISTRY.get_sample_value(*sample) - waited < 5
    with (
        pytest.raises(RuntimeError),
        observability.BatchObservation("ViT-B-32", handoffs, torch.device("cpu")),
    ):
        raise RuntimeError("boom")
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "clip.model_batch"]
    assert len(batches) == 2
    ok, failed = batches
    assert [link.context.span_id for link in ok.links] == [call.get_span_context().span_id]
    assert ok.parent is None and ok.attributes["clip.batch.items"] == 2
    assert ok.attributes["clip.text_cache.misses"] == 1
    children = {s.name: s for s in spans if s.parent and s.parent.span_id == ok.context.span_id}
    durations = {name: (s.end_time - s.start_time) / 1e9 for name, s in children.items()}
    assert durations == {"clip.encode_image": 0.25, "clip.encode_text": 0.125, "clip.score": 0.0625}
    assert (
        failed.status.status_code == trace.StatusCode.ERROR and failed.events[0].name == "exception"
    )


def test_gpu_memory_gauges_only_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gauge wiring (no GPU needed): CUDA devices report torch's allocator numbers, the CPU
    adds no series."""
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 8 * 2**20)

    def samples() -> list[object]:
        return [
            sample
            for family in prometheus_client.REGISTRY.collect()
            if family.name == "clip_gpu_memory_bytes"
            for sample in family.samples
        ]

    observability.record_gpu_memory(torch.device("cpu"))
    assert samples() == []
    observability.record_gpu_memory(torch.device("cuda:1"))
    for kind, value in (("allocated", 3 * 2**20), ("reserved", 8 * 2**20)):
        labels = {"device": "cuda:1", "kind": kind}
        assert prometheus_client.REGISTRY.get_sample_value("clip_gpu_memory_bytes", labels) == value
    assert len(samples()) == 2
