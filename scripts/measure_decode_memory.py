"""RSS of the HTTP (evaluator) worker after hostile decodes: idle, then after N requests of a
16-bit 6300x6300 PNG (~80 KB that decodes to 80 MB) sent C at a time.

    python scripts/measure_decode_memory.py http://127.0.0.1:3000 --requests 100 --concurrency 8

Run it on the server's machine (the evaluator worker is found by its listening port). It
prints figures and exits 1 when the worker grew by more than --max-growth-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import sys

import httpx
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


def rss_mb(workers: list[psutil.Process]) -> float:
    return max(worker.memory_info().rss for worker in workers) / 2**20


async def send_all(url: str, body: dict, requests: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one() -> None:
            async with gate:
                response = await client.post("/evaluator/v1/evaluation/single", json=body)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(one() for _ in range(requests)))
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-growth-mb", type=float, default=300)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("I;16", (6300, 6300), 40_000).save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "text": "a"}
    workers = evaluator_workers(httpx.URL(args.url).port or 80)
    if not workers:
        print("no evaluator worker found on this machine")
        return 2
    idle = rss_mb(workers)
    statuses = asyncio.run(send_all(args.url, body, args.requests, args.concurrency))
    after = rss_mb(workers)
    print(f"PNG {len(buffer.getvalue())} bytes, {args.requests} requests x{args.concurrency}")
    print(f"statuses {statuses}")
    print(
        f"evaluator worker RSS: idle {idle:.0f} MB, after {after:.0f} MB, "
        f"grew {after - idle:.0f} MB"
    )
    return 0 if after - idle <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
