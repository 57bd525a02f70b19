"""Smoke test of scripts/benchmark.py's in-process measurements on the tiny model: the figures are
printed, never asserted (benchmarks are not tests); this only checks that the pieces run and the
report renders."""

from __future__ import annotations

import argparse
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from clip_runtime import ClipEngine, ClipSettings
from clip_testkit.sample_images import jpeg_bytes
from scripts import benchmark as bench


def test_benchmark_pieces_run_and_render(tiny_model_dir: Path) -> None:
    config = bench.Config(True, 4, 1, 4, 2, 1.0, 1.0)
    engine = ClipEngine(
        ClipSettings(models=["ViT-B-32"], max_batch_size=2), {"ViT-B-32": tiny_model_dir}
    )
    model = engine.models["ViT-B-32"]
    pairs = [(jpeg_bytes(seed, 96, 72), "a cat") for seed in range(4)]
    rows = [
        bench.measure_ceiling(model, config),
        bench.measure_pipeline(engine, "ViT-B-32", pairs, "pipeline"),
        bench.measure_naive(tiny_model_dir, "ViT-B-32", pairs[:2], torch.device("cpu")),
    ]
    assert all(row.pairs_s > 0 and row.errors == 0 for row in rows)
    agreement = bench.agreement(model, [data for data, _ in pairs])
    assert set(agreement) == {"max_abs_uint8_levels", "max_abs_cosine"}
    result = {
        "started": "now",
        "command": "python -m scripts.benchmark --quick",
        "machine": bench.machine(torch.device("cpu")),
        "weights": "random-init",
        "images": "test",
        "notes": "",
        "rows": [asdict(row) for row in rows],
        "summary": {"ViT-B-32": {"ratio": 1.0}},
    }
    text = bench.markdown(result)
    assert text.count("| ViT-B-32 |") == 3 and "torch" in text


def test_runtime_comparison_runs_in_process(tiny_model_dir: Path) -> None:
    pytest.importorskip("openvino", reason="openvino is not installed")
    config = bench.Config(True, 4, 1, 4, 2, 1.0, 1.0)
    args = argparse.Namespace(
        runtimes=["torch-fp32", "openvino-fp32"], batch_scan=[2], no_service=True
    )
    pairs = [(jpeg_bytes(seed, 96, 72), "a cat") for seed in range(4)]
    rows, summary = bench.measure_runtimes(
        "ViT-B-32", tiny_model_dir, tiny_model_dir, [], pairs, config, args
    )
    names = [row.name for row in rows]
    assert names == [
        "ceiling: image encoder only, batch 4, torch fp32",
        "in-process bytes -> score, torch fp32",
        "ceiling: image encoder only, batch 4, openvino fp32",
        "ceiling: image encoder only, batch 2, openvino fp32",
        "in-process bytes -> score, openvino fp32",
    ]
    assert all(row.pairs_s > 0 for row in rows)
    assert set(summary) == {"openvino fp32 start s (converting)", "openvino fp32 start s (cached)"}


class _Answers(BaseHTTPRequestHandler):
    """200 for a body holding "ok", 503 for anything else; records the bodies it got."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append(body)
        self.send_response(200 if b"ok" in body else 503)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_load_generator_counts_failures_in_percentiles_and_numbers_unique_bodies() -> None:
    from clip_testkit.loadgen import UNIQUE_MARKER, run_load

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        bodies = [b'{"t": "ok ' + UNIQUE_MARKER + b'"}', b'{"t": "no"}']
        opened = run_load(url, bodies, mode="open", seconds=1.0, processes=2, rate=20)
        closed = run_load(url, bodies[:1], mode="closed", seconds=0.5, processes=1, clients=2)
    finally:
        server.shutdown()
    # Fixed arrivals: every scheduled request was sent, half of them answered 503.
    assert opened.sent == 20
    assert opened.failures == {"HTTP 503": 10} and len(opened.latencies_s) == 10
    row = bench.load_row("m", "open", opened, 1, "open 20/s", None)
    assert row.p95_ms == float("inf") and row.errors == 10 and row.failures == "HTTP 503: 10"
    assert closed.sent > 0 and not closed.failures
    numbered = [b for b in _Answers.bodies if b.startswith(b'{"t": "ok')]
    assert UNIQUE_MARKER not in b"".join(numbered)
    assert len(set(numbered)) == len(numbered)
