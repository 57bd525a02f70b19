"""RSS of the HTTP (evaluator) worker after hostile decodes: idle, then after N requests of a
16-bit 6300x6300 PNG (~80 KB that decodes to 80 MB) sent C at a time, or (``--urls K``) after
N rank requests naming K URLs to a ~14 MB PNG served by this script on ``--image-port`` (serve
with ``CLIP_URL_ALLOWED_HOSTS=127.0.0.1:PORT``); their last candidate is not an image, so every
image is fetched and decoded and the request answers 422 without model work (or earlier: 422
for a fetch that failed, 503 ``overloaded`` at the memory budget).

    python -m scripts.measure_decode_memory http://127.0.0.1:3000 --requests 100 --concurrency 8
    python -m scripts.measure_decode_memory http://127.0.0.1:3000 --urls 64 --requests 20

Run it on the server's machine (the evaluator worker is found by its listening port). It
prints figures and exits 1 when the worker, --settle-s after the last answer, has grown by more
than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import psutil
from PIL import Image


def evaluator_workers(port: int) -> list[psutil.Process]:
    """The clip-evaluator workers serving ``port`` (they share the arbiter's listening socket)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "_bentoml_impl.worker.service" not in cmdline or "clip-evaluator" not in cmdline:
            continue
        try:
            sockets = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(s.laddr and s.laddr.port == port and s.status == "LISTEN" for s in sockets):
            found.append(process)
    return found


def deep_png() -> bytes:
    """A 16-bit 6300x6300 PNG: ~80 KB that decodes to 80 MB."""
    buffer = io.BytesIO()
    Image.new("I;16", (6300, 6300), 40_000).save(buffer, format="PNG")
    return buffer.getvalue()


def large_png() -> bytes:
    """A ~14 MB PNG of noise (2150x2150 RGB, incompressible): what a hostile URL points at."""
    noise = np.random.default_rng(0).integers(0, 256, (2150, 2150, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def serve_image(png: bytes, port: int) -> None:
    """The large PNG at http://127.0.0.1:PORT/big.png, from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a refused request's other fetches are cut: expected, not worth a traceback

    httpd = Server(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()


def rss_mb(workers: list[psutil.Process]) -> float:
    return max(worker.memory_info().rss for worker in workers) / 2**20


async def send_all(
    url: str, path: str, body: dict, requests: int, concurrency: int
) -> dict[int, int]:
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one() -> None:
            async with gate:
                response = await client.post(path, json=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(one() for _ in range(requests)))
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-growth-mb", type=float, default=300)
    parser.add_argument("--urls", type=int, default=0, help="URLs per rank request (0: PNGs)")
    parser.add_argument("--image-port", type=int, default=8931)
    parser.add_argument(
        "--settle-s",
        type=float,
        default=3.0,
        help="wait this long after the last answer before reading RSS (the worker returns "
        "memory 1 s after its decodes go idle, clip_runtime/memory.py TRIM_DELAY_S)",
    )
    args = parser.parse_args()
    if args.urls:
        png = large_png()
        image_url = f"http://127.0.0.1:{args.image_port}/big.png"
        serve_image(png, args.image_port)
        path = "/evaluator/v1/evaluation/rank"
        body: dict = {"images": [image_url] * args.urls + ["!!"], "text": "a"}
    else:
        png = deep_png()
        path = "/evaluator/v1/evaluation/single"
        body = {"image": base64.b64encode(png).decode(), "text": "a"}
    workers = evaluator_workers(httpx.URL(args.url).port or 80)
    if not workers:
        print("no evaluator worker found on this machine")
        return 2
    idle = rss_mb(workers)
    peak = [idle]
    answered = threading.Event()

    def sample_peak() -> None:  # RSS every 0.1 s until every request is answered
        while not answered.wait(0.1):
            peak[0] = max(peak[0], rss_mb(workers))

    sampler = threading.Thread(target=sample_peak, daemon=True)
    sampler.start()
    statuses = asyncio.run(send_all(args.url, path, body, args.requests, args.concurrency))
    answered.set()
    sampler.join()
    right_after = rss_mb(workers)
    time.sleep(args.settle_s)
    after = rss_mb(workers)
    what = f"{args.urls} URLs to a " if args.urls else ""
    print(f"{what}PNG of {len(png)} bytes, {args.requests} requests x{args.concurrency}")
    print(f"statuses {statuses}")
    print(
        f"evaluator worker RSS: idle {idle:.0f} MB, peak {max(peak[0], right_after):.0f} MB, "
        f"at the last answer {right_after:.0f} MB, "
        f"{args.settle_s:g} s later {after:.0f} MB: grew {after - idle:.0f} MB"
    )
    return 0 if after - idle <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
