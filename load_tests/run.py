"""Run the Locust workloads headless and judge the result.

    python -m load_tests.run                       # starts a service (random-init if none saved)
    python -m load_tests.run --port 3100           # ... on that port
    python -m load_tests.run --url http://127.0.0.1:3000 --users 20 --run-time 60

Writes ``reports/<name>.html`` and ``reports/<name>.json`` (Locust's own), prints p50/p95/p99
per request name and the failure counts, and exits 1 when any failure appears (a status other
than 200, an expected 4xx, or a shed: 503/429 ``overloaded`` with Retry-After), 0 otherwise.

The figures come from Locust's final statistics (``--json-file``, written after the users have
stopped), not from its ``--csv`` files: those are rewritten once a second while the test runs
and miss the requests that finish during the stop timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from clip_testkit.latency import REPORTED, percentile

if TYPE_CHECKING:
    from clip_testkit.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service; default: start one on 127.0.0.1")
    parser.add_argument(
        "--port", type=int, help="the port of the service started here (default: a free one)"
    )
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=4.0)
    parser.add_argument("--run-time", default="30s", help="Locust's format: 30s, 5m, ...")
    parser.add_argument("--user-classes", nargs="*", default=[], help="default: all of them")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports")
    parser.add_argument("--name", default="load", help="report file prefix")
    parser.add_argument("--models", default="ViT-B-32", help="CLIP_MODELS of a started service")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a URL that is not loopback"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CLIP_API_KEY") or None,
        help="the service's API key (default: the CLIP_API_KEY environment variable); "
        "passed to Locust in its environment, not on its command line",
    )
    return parser.parse_args(argv)


def check_target(url: str, allow_remote: bool) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not allow_remote:
        raise SystemExit(f"refusing to load {host!r}: only loopback unless --allow-remote")


def bentoml_home() -> Path:
    """The user's store when it has the models; otherwise a project-local one (gitignored)."""
    home = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
    if (home / "models" / "clip-vit-b-32" / "latest").is_file():
        return home
    return ROOT / ".bentoml-home"


def start_service(models: str, log_dir: Path, port: int | None = None) -> ServerProcess:
    from clip_runtime.model_entry import store_name
    from clip_testkit.server import ServerProcess, save_random_init_models

    home = bentoml_home()
    wanted = models.split(",")
    missing = [m for m in wanted if not (home / "models" / store_name(m) / "latest").is_file()]
    if missing:
        print(f"no saved {missing} in {home}: saving RANDOM-INIT demo weights", flush=True)
        save_random_init_models(home, missing)
    server = ServerProcess(home, log_dir / "serve.log", {"CLIP_MODELS": models}, port=port)
    print(f"starting the service ({models}) on {server.url} ...", flush=True)
    return server.start()


def summarize(stats_json: Path) -> tuple[int, int]:
    """Print the percentile table of Locust's final statistics; return (requests, failures).

    Read as JSON rather than through Locust's classes: importing locust monkey-patches this
    process (gevent), which deadlocks the threads of a caller such as a test.
    """
    rows = []
    for entry in sorted(json.loads(stats_json.read_text()), key=lambda e: e["name"]):
        histogram = Counter({int(ms): count for ms, count in entry["response_times"].items()})
        rows.append((entry["name"], entry["num_requests"], entry["num_failures"], histogram))
    total = Counter[int]()
    for _, _, _, histogram in rows:
        total.update(histogram)
    rows.append(("Aggregated", sum(r[1] for r in rows), sum(r[2] for r in rows), total))
    print(f"{'name':34} {'reqs':>7} {'fails':>6} {'p50':>7} {'p95':>7} {'p99':>7}  (ms)")
    for name, requests, failures, histogram in rows:
        # Locust's histogram keys are rounded milliseconds; its rule is the shared one.
        p50, p95, p99 = (int(percentile(histogram, f) or 0) for f in REPORTED.values())
        print(f"{name[:34]:34} {requests:>7} {failures:>6} {p50:>7} {p95:>7} {p99:>7}")
    return rows[-1][1], rows[-1][2]


def run(args: argparse.Namespace) -> int:
    args.reports.mkdir(parents=True, exist_ok=True)
    server = None
    url = args.url
    if url is None:
        log_dir = Path(tempfile.mkdtemp(prefix="load-test-"))
        server = start_service(args.models, log_dir, args.port)
        url = server.url
    check_target(url, args.allow_remote)
    prefix = args.reports / args.name
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        url,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--stop-timeout",
        "30",
        "--html",
        f"{prefix}.html",
        "--json-file",
        str(prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
        *args.user_classes,
    ]
    env = {**os.environ}
    if args.api_key:
        env["CLIP_API_KEY"] = args.api_key  # the locustfile's --api-key option reads it
    started = time.monotonic()
    try:
        subprocess.run(command, cwd=ROOT, env=env, check=False)
    finally:
        if server is not None:
            server.stop()
    total, failures = summarize(Path(f"{prefix}.json"))
    print(f"{total} requests, {failures} failures in {time.monotonic() - started:.0f} s")
    print(f"report: {prefix}.html  stats: {prefix}.json")
    if total == 0 or failures:
        print("FAIL: unexpected failures (or no requests)" if total else "FAIL: no requests")
        return 1
    print("PASS: only 200s, expected 4xx and shed 503/429 `overloaded` with Retry-After")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
