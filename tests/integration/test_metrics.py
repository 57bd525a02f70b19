"""The project's Prometheus metrics after real traffic, their bounded label sets, and the Grafana
dashboard's queries against what /metrics really exposes."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
import yaml

from clip_runtime import errors as clip_errors
from clip_testkit.metrics import metric, series
from clip_testkit.routes import BATCH, SINGLE
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ROOT
from tests.test_k8s_manifests import ADAPTER_SERIES

pytestmark = pytest.mark.integration

DASHBOARD = ROOT / "deploy" / "observability" / "grafana" / "dashboards" / "clip-score.json"
ALERTS = ROOT / "deploy" / "observability" / "alerts.yml"
# Series Prometheus makes itself (not the service's).
PROMETHEUS_OWN = {"up"}
ERROR_CODES = {
    error.code
    for error in vars(clip_errors).values()
    if isinstance(error, type) and issubclass(error, clip_errors.ClipError)
}
# Only exported where the scorer runs on CUDA (the test servers run on the CPU).
CUDA_ONLY = {"clip_gpu_memory_bytes"}


def _clip_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("clip_")}


def test_metrics_count_real_traffic(client: httpx.Client) -> None:
    before = client.get("/evaluator/metrics").text
    good = [{"image": b64(jpeg_bytes(i, 96, 80)), "text": f"metrics caption {i}"} for i in range(5)]
    for item in good[:2]:
        assert client.post(SINGLE, json=item).status_code == 200
    bad = [
        {"image": "AAAA", "text": "x"},  # invalid_image
        {"image": b64(jpeg_bytes(0, 64, 64)), "text": " "},  # empty_text
        {"text": "no image"},  # invalid_request
    ]
    response = client.post(BATCH, json={"items": [*good[2:], *bad]})
    assert response.json()["failed"] == 3
    assert client.post(SINGLE, json={"image": "AAAA", "text": "y"}).status_code == 422
    after = client.get("/metrics").text
    # Both endpoints serve the same aggregated project metrics.
    assert _clip_lines(client.get("/evaluator/metrics").text) == _clip_lines(after)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    b32 = {"model": "ViT-B-32"}
    assert delta("clip_pairs_total", outcome="ok", **b32) == 5
    assert delta("clip_pairs_total", outcome="error", **b32) == 4
    assert delta("clip_errors_total", code="invalid_image") == 2
    assert delta("clip_errors_total", code="empty_text") == 1
    assert delta("clip_errors_total", code="invalid_request") == 1
    assert delta("clip_model_batch_items_sum", **b32) == 5
    assert delta("clip_queue_wait_seconds_count", **b32) == 5
    assert 0 < delta("clip_queue_wait_seconds_sum", **b32) < 60
    # Decoded: the 5 good pairs and the 2 undecodable images (checks before decode stop the rest).
    assert delta("clip_stage_seconds_count", stage="decode", **b32) == 7
    batches = delta("clip_model_batches_total", **b32)
    assert 1 <= batches <= 3
    for stage in ("encode_image", "encode_text", "score"):
        assert delta("clip_stage_seconds_count", stage=stage, **b32) == batches
    # Fresh captions: every text missed the cache once.
    assert delta("clip_text_cache_total", result="miss", **b32) == 5
    info = metric(
        after, "clip_model_info", model="ViT-B-32", architecture="ViT-B-32",
        weights="random-init", device="cpu", dtype="fp32", pretrained="",
    )  # fmt: skip
    assert info == 1
    assert "clip_gpu_memory_bytes" not in after  # CPU: no GPU series at all


def test_unknown_paths_and_models_add_no_series(client: httpx.Client) -> None:
    def unknown_model() -> None:
        body = {"image": "AAAA", "text": "x", "model": uuid.uuid4().hex}
        assert client.post(SINGLE, json=body).json()["error"]["code"] == "unknown_model"

    client.get(f"/{uuid.uuid4().hex}")  # the one "/{unknown}" series may appear now
    unknown_model()  # and the one model="unknown"
    client.get("/evaluator/metrics")
    known = series(client.get("/evaluator/metrics").text)
    paths = [f"/{uuid.uuid4().hex}/x" for _ in range(10)]
    paths += [f"/evaluator/{uuid.uuid4().hex}" for _ in range(10)]
    for path in paths:
        assert client.get(path).status_code == 404
        assert client.post(path, json={}).status_code in (404, 405)
        unknown_model()
    text = client.get("/evaluator/metrics").text
    assert series(text) == known
    assert not any(path in text for path in paths)
    assert metric(text, "bentoml_service_request_total", endpoint="/{unknown}") >= 40
    assert metric(text, "clip_pairs_total", model="unknown", outcome="error") >= 21


# -- the dashboard ------------------------------------------------------------------------------

# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "max", "min",
    "avg", "count", "topk", "clamp_min", "le", "on", "ignoring", "group_left", "or", "and",
    "unless", "vector", "offset", "bool", "label_replace", "sort_desc", "abs", "time",
}  # fmt: skip


def expr_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges and strings removed)."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in PROMQL_WORDS}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    """Metric names in every panel's PromQL."""
    return {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in expr_metric_names(target["expr"])
    }


def exposed_after_traffic(client: httpx.Client) -> tuple[set[str], str]:
    """The metric names /metrics exposes after one scored and one refused request, and its
    text (whichever tests ran before)."""
    assert client.post(SINGLE, json={"image": b64(jpeg_bytes(3)), "text": "dash"}).is_success
    assert client.post(SINGLE, json={"image": "bm9wZQ==", "text": "dash"}).status_code == 422
    text = client.get("/metrics").text
    names = {
        re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line[:1] != "#"
    }
    return names, text


def assert_matchers_select_series(where: str, expr: str, text: str) -> None:
    """Each equality label matcher must match at least one exposed series."""
    for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
        assert any(
            line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
            for line in text.splitlines()
        ), f"{where}: {name}{{{matchers}}} selects nothing"


def test_dashboard_queries_exist(client: httpx.Client) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = dashboard_metric_names(dashboard)
    assert {"clip_pairs_total", "clip_stage_seconds_bucket"} <= names  # the parser finds them
    exposed, text = exposed_after_traffic(client)
    missing = names - exposed - CUDA_ONLY
    assert not missing, f"dashboard queries metrics /metrics does not have: {missing}"
    assert names >= CUDA_ONLY
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert_matchers_select_series(panel["title"], target["expr"], text)


def test_alert_rules_and_the_autoscaling_metric_exist(client: httpx.Client) -> None:
    """deploy/observability/alerts.yml (error rate, p99, queue wait, model not ready) and the
    prometheus-adapter rule of deploy/k8s read metrics /metrics really exposes."""
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    exposed, text = exposed_after_traffic(client)
    used: set[str] = set()
    for rule in group["rules"]:
        assert rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
        names = expr_metric_names(rule["expr"])
        assert names, rule["alert"]
        missing = names - exposed - PROMETHEUS_OWN
        assert not missing, f"{rule['alert']} uses metrics /metrics does not have: {missing}"
        # Label names must exist on the metric; values may be the very condition watched for
        # (code="overloaded" appears only under overload), so codes must be the service's own.
        for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", rule["expr"]):
            if name in PROMETHEUS_OWN:  # its labels come from the scrape config (job)
                continue
            for label, value in re.findall(r'(\w+)\s*(?:=~|!=|=)\s*"([^"]*)"', matchers):
                assert re.search(rf"^{name}\{{[^}}]*\b{label}=", text, re.MULTILINE), (
                    f"{rule['alert']}: {name} has no label {label}"
                )
                if label == "code":
                    assert value in ERROR_CODES, value
        used |= names
    assert {
        "bentoml_service_request_total",  # error rate
        "bentoml_service_request_duration_seconds_bucket",  # p99
        "clip_queue_wait_seconds_bucket",  # queue wait
        "clip_model_info",  # model not ready
    } <= used
    assert ADAPTER_SERIES in exposed


def test_stack_configuration() -> None:
    """The compose stack wires what docs/operations.md says: Prometheus scrapes the service's
    /metrics, the collector takes OTLP/HTTP on 4318 and sends to Jaeger, Grafana gets both
    datasources."""
    stack = ROOT / "deploy" / "observability"
    prometheus = yaml.safe_load((stack / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "clip-score"  # what the alert rules select
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["host.docker.internal:3000"]
    collector = yaml.safe_load((stack / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert collector["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]
    compose = yaml.safe_load((stack / "compose.yaml").read_text())["services"]
    rule_mounts = dict(v.split(":")[:2] for v in compose["prometheus"]["volumes"])
    assert prometheus["rule_files"] == [rule_mounts["./alerts.yml"]]
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(compose)
    assert "4318:4318" in compose["otel-collector"]["ports"]
    for service in compose.values():  # every mounted file exists
        for volume in service.get("volumes", []):
            assert (stack / volume.split(":")[0]).exists(), volume
    provisioning = stack / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yml").read_text())
    uids = {source["uid"] for source in sources["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert used <= uids
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())[
        "providers"
    ]
    grafana_mounts = dict(v.split(":")[:2] for v in compose["grafana"]["volumes"])
    assert grafana_mounts["./grafana/dashboards"] == provider["options"]["path"]
