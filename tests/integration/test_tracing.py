"""Tracing end to end: `bentoml serve` with only OTEL_EXPORTER_OTLP_ENDPOINT set, exporting to a
real OTLP/HTTP receiver; and a server whose exporter cannot be imported."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clip_testkit.metrics import metric
from clip_testkit.routes import BATCH, SINGLE
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ServerProcess, launched_together
from tests.integration.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@dataclass
class ModuleServers:
    traced: ServerProcess
    without_exporter: ServerProcess  # the OTLP exporter cannot be imported

    def all(self) -> list[ServerProcess]:
        return [self.traced, self.without_exporter]


@pytest.fixture(scope="module")
def servers(
    bentoml_home: Path, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleServers]:
    """This module's two servers, launched together so that their start-ups overlap."""
    folder = tmp_path_factory.mktemp("traced")
    env = {
        "CLIP_MODELS": "ViT-B-32",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export within the test's patience
        "CLIP_LOG_FORMAT": "json",
    }
    # Two evaluator processes: metrics must still add up (multiprocess mode).
    (folder / "bentoml.yaml").write_text("services:\n  clip-evaluator:\n    workers: 2\n")
    (folder / "shim").mkdir()
    (folder / "shim" / "sitecustomize.py").write_text(SHIM)
    launched = ModuleServers(
        traced=ServerProcess(
            bentoml_home,
            folder / "serve.log",
            {**env, "BENTOML_CONFIG": str(folder / "bentoml.yaml")},
        ),
        without_exporter=ServerProcess(
            bentoml_home,
            folder / "without-exporter.log",
            {
                "CLIP_MODELS": "ViT-B-32",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                "PYTHONPATH": str(folder / "shim"),
            },
        ),
    )
    with launched_together(launched.all()):
        yield launched


@pytest.fixture(scope="module")
def traced_server(servers: ModuleServers) -> ServerProcess:
    return servers.traced.wait_ready()


def _children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.parent_id == parent.span_id}


def test_request_and_batch_spans(traced_server: ServerProcess, receiver: OtlpReceiver) -> None:
    with httpx.Client(base_url=traced_server.url, timeout=120) as client:
        for path in ("/readyz", "/livez", "/metrics", "/evaluator/health", "/evaluator/metrics"):
            assert client.get(path).status_code == 200
        single = client.post(SINGLE, json={"image": b64(jpeg_bytes(1)), "text": "a cat"})
        assert single.status_code == 200, single.text
        items = [{"image": b64(jpeg_bytes(i)), "text": f"caption {i}"} for i in range(3)]
        batch = client.post(BATCH, json={"items": [*items, {"image": "AAAA", "text": "x"}]})
        assert batch.status_code == 200 and batch.json()["succeeded"] == 3

    def complete(spans: list[ReceivedSpan]) -> bool:
        # Server spans end last: wait for both requests' ones as well as the batches.
        names = [s.name for s in spans]
        requests = {f"POST {SINGLE}", f"POST {BATCH}"}
        return names.count("clip.model_batch") >= 2 and requests <= set(names)

    spans = receiver.wait_for(complete)
    assert receiver.paths == {"/v1/traces"}
    roots = {
        s.attributes.get("http.target", s.name): s
        for s in spans
        if s.service == "clip-evaluator" and not s.parent_id
    }
    # Probes and scrapes are excluded; the two scored requests are root server spans.
    dump = [(s.name, s.service, s.trace_id[:6], s.span_id[:6], s.parent_id[:6]) for s in spans]
    assert set(roots) == {SINGLE, BATCH}, dump
    for path, pairs in ((SINGLE, 1), (BATCH, 3)):
        request = roots[path]
        assert request.name.startswith("POST ")
        children = _children(spans, request)
        assert {"clip.decode", "clip.model_call"} <= set(children), set(children)
        call = children["clip.model_call"]
        assert call.attributes["clip.model"] == "ViT-B-32"
        assert call.attributes["clip.pairs"] == pairs
        decodes = [s for s in spans if s.name == "clip.decode" and s.parent_id == request.span_id]
        assert len(decodes) == (1 if path == SINGLE else 4)  # the bad item was decoded too
        # The model batch that served the call: linked to it, with its size and stage children.
        (batch_span,) = [s for s in spans if (call.trace_id, call.span_id) in s.links]
        assert batch_span.name == "clip.model_batch" and batch_span.service == "clip-scorer"
        assert batch_span.attributes["clip.model"] == "ViT-B-32"
        assert batch_span.attributes["clip.batch.items"] == pairs
        assert batch_span.attributes["clip.text_cache.misses"] == pairs
        assert not batch_span.parent_id and batch_span.trace_id != call.trace_id
        stages = _children(spans, batch_span)
        assert set(stages) >= {"clip.encode_image", "clip.encode_text", "clip.score"}


def test_json_logs_carry_the_trace_id(traced_server: ServerProcess, receiver: OtlpReceiver) -> None:
    with httpx.Client(base_url=traced_server.url, timeout=120) as client:
        response = client.post(SINGLE, json={"image": "AAAA", "text": "x"})
    assert response.status_code == 422

    def access_records() -> list[dict]:
        records = [
            json.loads(line)
            for line in traced_server.log_path.read_text(errors="replace").splitlines()
            if line.startswith("{")
        ]
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
        # The only 422 on this path (the access log has no query string to tag it with).
        return [
            r
            for r in records
            if f"path={SINGLE}," in r["message"] and "(status=422," in r["message"]
        ]

    deadline = time.monotonic() + 30  # the access log line is written after the response
    while not access_records() and time.monotonic() < deadline:
        time.sleep(0.2)
    (access,) = access_records()
    assert len(access["trace_id"]) == 32 and len(access["span_id"]) == 16

    # The same trace id as the request's server span that the collector received.
    def roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == access["trace_id"] and not s.parent_id]

    # The server span ends last, so it may come in a later export than its children.
    request = roots(receiver.wait_for(lambda spans: bool(roots(spans))))
    assert [s.name for s in request] == [f"POST {SINGLE}"]


def test_metrics_add_up_over_two_workers(traced_server: ServerProcess) -> None:
    def scrape() -> str:
        return httpx.get(traced_server.url + "/metrics", timeout=60).text

    async def fire(count: int) -> list[httpx.Response]:
        # Concurrent requests open a connection each; the busy worker leaves some to the other.
        async with httpx.AsyncClient(base_url=traced_server.url, timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        SINGLE,
                        json={"image": b64(jpeg_bytes(i % 3)), "text": f"worker {i}"},
                    )
                    for i in range(count)
                )
            )

    def workers() -> set[str]:
        return {
            json.loads(line)["component"]
            for line in traced_server.log_path.read_text(errors="replace").splitlines()
            if line.startswith("{") and f"path={SINGLE}," in line and "bentoml.access" in line
        }

    # The kernel hands connections to whichever worker accepts first, so send rounds of
    # concurrent requests until both workers have answered some (almost always the first round).
    before, sent = scrape(), 0
    for _ in range(10):
        assert [r.status_code for r in asyncio.run(fire(16))] == [200] * 16
        sent += 16
        time.sleep(0.5)  # access log lines are written after the responses
        if len(workers()) == 2:
            break
    assert len(workers()) == 2, workers()
    after = scrape()
    ok = {"model": "ViT-B-32", "outcome": "ok"}
    assert (
        metric(after, "clip_pairs_total", **ok) - metric(before, "clip_pairs_total", **ok) == sent
    )


SHIM = """
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("opentelemetry.exporter.otlp.proto.http"):
            raise ImportError(f"{name} blocked by the test shim")
        return None

sys.meta_path.insert(0, _Block())
"""


def test_missing_exporter_starts_without_tracing(servers: ModuleServers) -> None:
    process = servers.without_exporter.wait_ready()
    with httpx.Client(base_url=process.url, timeout=120) as client:
        response = client.post(SINGLE, json={"image": b64(jpeg_bytes(2)), "text": "a dog"})
    assert response.status_code == 200, response.text
    log = process.log_path.read_text(errors="replace")
    assert "TRACING DISABLED" in log and "blocked by the test shim" in log
    assert process.process is not None and process.process.poll() is None
