"""Tracing set-up in a fresh interpreter (it changes BentoML's process-wide container): the
standard OTEL_* variables alone, BentoML's own tracing config, and a missing exporter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.integration.test_tracing import SHIM

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
import observability
from bentoml._internal.configuration.containers import BentoMLContainer as C
on = observability.setup_tracing()
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
