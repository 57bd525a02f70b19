"""The shared percentile rule, and the shared load generator's per-request records (what the
fault checks judge: status, Retry-After, error code, on the caller's clock)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from clip_testkit.latency import latency_percentiles_ms, percentile
from clip_testkit.loadgen import run_load


def test_percentile_is_the_nearest_rank_of_values_or_of_a_histogram() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert [percentile(values, f) for f in (0.5, 0.95, 0.99, 1.0)] == [50, 95, 99, 100]
    assert percentile([3.0], 0.99) == 3.0 and percentile([], 0.5) is None
    # Locust's histogram (rounded ms -> count) gives what the values it counts give.
    histogram = Counter({10: 90, 200: 9, 900: 1})
    expanded = [10.0] * 90 + [200.0] * 9 + [900.0]
    for fraction in (0.5, 0.9, 0.91, 0.99, 0.999):
        assert percentile(histogram, fraction) == percentile(expanded, fraction)


def test_failures_count_as_unbounded_latencies() -> None:
    assert latency_percentiles_ms([0.010] * 98, failed=2) == {
        "p50_ms": 10.0,
        "p95_ms": 10.0,
        "p99_ms": float("inf"),
    }
    assert latency_percentiles_ms([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


class _Sheds(BaseHTTPRequestHandler):
    """200 for a body holding "ok"; otherwise 503 ``overloaded`` with Retry-After."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = b"{}" if b"ok" in body else json.dumps({"error": {"code": "overloaded"}}).encode()
        self.send_response(200 if b"ok" in body else 503)
        if b"ok" not in body:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


def test_records_hold_each_answer_on_the_callers_clock() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sheds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    called = time.monotonic()
    try:
        load = run_load(
            url, [b'{"t": "ok"}', b'{"t": "no"}'], mode="open", seconds=1.0, processes=2, rate=10
        )
    finally:
        server.shutdown()
    returned = time.monotonic()
    assert len(load.records) == load.sent == 10
    shed = [r for r in load.records if r.status == 503]
    assert len(shed) == 5 and {(r.retry_after, r.code) for r in shed} == {("1", "overloaded")}
    assert load.failures == {"HTTP 503": 5} and len(load.latencies_s) == 5
    # Every process stamps time.monotonic(): comparable with the caller's (the sigkill check).
    assert all(called < r.sent_at < r.answered_at < returned for r in load.records)
