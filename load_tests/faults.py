"""Long reliability checks against a service started here on 127.0.0.1, each with a verdict.

    python -m load_tests.faults overload   # capacity, then 5 min at ~2x capacity: shed, not queue
    python -m load_tests.faults sigkill    # SIGKILL the model worker under load: recovery time
    python -m load_tests.faults soak       # RSS of every server process over a long run
    python -m load_tests.faults all        # the three, on one service (make reliability)

Figures go to ``reports/faults-<check>.json`` and stdout; the exit status is 1 when a verdict
fails. The traffic (``clip_testkit.loadgen``, the benchmark's generator) is an open loop:
requests are sent on a schedule whatever the answers, so overload is real overload and not
slowed down by the client waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from clip_runtime.settings import ClipSettings
from clip_testkit.latency import LatencyPercentiles, latency_percentiles_ms
from clip_testkit.loadgen import START_DELAY_S, RequestRecord, run_load
from clip_testkit.routes import SINGLE
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ServerProcess, save_random_init_models
from load_tests.run import bentoml_home
from load_tests.verdicts import is_deliberate_shed, is_worker_down_answer

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [b64(jpeg_bytes(seed, 320, 240)) for seed in range(4)]
CAPTIONS = ["a photo of a cat", "a red bus in the rain", "a bowl of soup"]
# Every image with every caption: the pairs the checks send, in turn.
BODIES = [
    json.dumps({"image": IMAGES[i % len(IMAGES)], "text": CAPTIONS[i % len(CAPTIONS)]}).encode()
    for i in range(len(IMAGES) * len(CAPTIONS))
]
# One generator process: the checks run on small machines, beside the service.
GENERATOR_PROCESSES = 1


@dataclass
class Traffic:
    records: list[RequestRecord] = field(default_factory=list)  # as the load generator took them

    def by(self, status: int) -> list[RequestRecord]:
        return [r for r in self.records if r.status == status]


def is_shed(record: RequestRecord) -> bool:
    return is_deliberate_shed(record.status, record.retry_after, record.code)


def is_worker_down(record: RequestRecord) -> bool:
    return is_worker_down_answer(record.status, record.retry_after, record.code)


def is_failure(record: RequestRecord) -> bool:
    """Neither served nor shed deliberately: a 5xx, any other 503 (``model_not_ready`` with no
    worker killed included), a 503 without Retry-After, a dropped link."""
    return record.status != 200 and not is_shed(record)


class LatencySummary(LatencyPercentiles):
    count: int


def latency_summary(records: list[RequestRecord]) -> LatencySummary:
    return LatencySummary(
        count=len(records), **latency_percentiles_ms(r.latency_s for r in records)
    )


async def open_loop(url: str, rate: float, seconds: float, traffic: Traffic) -> None:
    """``rate`` requests per second for ``seconds``, each on its own, whatever the answers; the
    first is sent ``START_DELAY_S`` after the call."""
    load = await asyncio.to_thread(
        run_load,
        url + SINGLE,
        BODIES,
        mode="open",
        seconds=seconds,
        processes=GENERATOR_PROCESSES,
        rate=rate,
    )
    traffic.records += load.records


async def closed_loop(url: str, concurrency: int, seconds: float) -> Traffic:
    """``concurrency`` clients back to back: what the service completes per second."""
    load = await asyncio.to_thread(
        run_load,
        url + SINGLE,
        BODIES,
        mode="closed",
        seconds=seconds,
        processes=GENERATOR_PROCESSES,
        clients=concurrency,
    )
    return Traffic(load.records)


def write(name: str, figures: dict[str, object]) -> None:
    path = ROOT / "reports" / f"faults-{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(f"({path})")


def overload(server: ServerProcess, args: argparse.Namespace) -> bool:
    warm = asyncio.run(closed_loop(server.url, args.in_flight, 10))  # warm-up, not counted
    measured = asyncio.run(closed_loop(server.url, args.in_flight, args.capacity_seconds))
    ok_count = len(measured.by(200))
    capacity = ok_count / args.capacity_seconds
    rate = 2 * capacity
    traffic = Traffic()
    samples = asyncio.run(open_loop_sampling_rss(server, rate, args.overload_seconds, traffic))
    early, late, growth = rss_growth(samples)
    shed = [o for o in traffic.records if is_shed(o)]
    others = [o for o in traffic.records if o.status != 200 and not is_shed(o)]
    ok_summary, shed_summary = latency_summary(traffic.by(200)), latency_summary(shed)
    figures = {
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "warm_up_requests": len(warm.records),
        "capacity_rps": round(capacity, 2),
        "capacity_latency": latency_summary(measured.by(200)),
        "offered_rps": round(rate, 2),
        "seconds": args.overload_seconds,
        "latency_budget_ms": args.latency_budget_ms,
        "sent": len(traffic.records),
        "ok": ok_summary,
        "shed": shed_summary,
        "other_statuses": sorted({f"{o.status} {o.code or ''}".strip() for o in others}),
        "other_count": len(others),
        "in_flight_limit": args.in_flight,
        "rss_mb_second_quarter_mean": round(early, 1),
        "rss_mb_last_quarter_mean": round(late, 1),
        "rss_growth_pct": round(growth, 2),
    }
    passed = (
        not others
        and bool(shed)
        and (ok_summary["p99_ms"] or 0) <= args.latency_budget_ms
        and (shed_summary["p99_ms"] or 0) <= 100
        and growth <= args.max_overload_rss_growth_pct
    )
    figures["verdict"] = "PASS" if passed else "FAIL"
    write("overload", figures)
    return passed


def scorer_worker(server: ServerProcess) -> psutil.Process:
    for worker in server.workers():
        if "clip-scorer" in " ".join(worker.cmdline()):
            return worker
    raise RuntimeError("no clip-scorer worker found")


def sigkill(server: ServerProcess, args: argparse.Namespace) -> bool:
    victim = scorer_worker(server)
    traffic = Traffic()
    readyz: list[tuple[float, float, int]] = []  # (sent, answered: s after the kill; status)

    killed_utc = ""

    async def scenario() -> float:
        load = asyncio.create_task(
            open_loop(server.url, args.kill_rate, args.kill_seconds, traffic)
        )
        await asyncio.sleep(START_DELAY_S + 5)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        nonlocal killed_utc
        killed_utc = (
            time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}"
        )
        # Every probe is sent after the kill, so a 200 comes from the restarted worker. It may
        # never see a non-200: BentoML's own probe of the worker (5 s) waits in the worker's
        # socket backlog, which circus keeps open, and a quick restart answers it.
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
            while (sent := time.monotonic() - killed_at) < args.kill_seconds:
                try:
                    status = (await client.get("/readyz")).status_code
                except httpx.TransportError:
                    status = 0
                readyz.append((sent, time.monotonic() - killed_at, status))
                if status == 200:
                    break
                await asyncio.sleep(0.2)
        await load
        return killed_at

    killed_at = asyncio.run(scenario())
    not_ready = [t for _, t, s in readyz if s != 200]
    recovered = [t for _, t, s in readyz if s == 200]
    new_scorer = scorer_worker(server).pid if recovered else None
    # The kill is deliberate: 503 model_not_ready + Retry-After is the right answer from the kill
    # until a second after /readyz is 200 again. Anything else that is not 200 is a failure.
    window_end = killed_at + (recovered[0] if recovered else args.kill_seconds) + 1

    def during_kill(o: RequestRecord) -> bool:
        return is_worker_down(o) and o.answered_at >= killed_at and o.sent_at <= window_end

    worker_down = [o for o in traffic.records if during_kill(o)]
    failed = [o for o in traffic.records if is_failure(o) and not during_kill(o)]
    after = [o for o in traffic.records if recovered and o.sent_at > window_end]
    figures = {
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "killed_pid": victim.pid,
        "killed_at_utc": killed_utc,
        "readyz_went_non_200": bool(not_ready),
        "recovery_s": round(recovered[0], 2) if recovered else None,
        "max_recovery_s": args.max_recovery_s,
        "sent": len(traffic.records),
        "ok": len(traffic.by(200)),
        "shed": sum(is_shed(o) for o in traffic.records),
        "model_not_ready_during_kill": len(worker_down),
        "failed": len(failed),
        "failed_statuses": sorted({f"{o.status} {o.code or ''}".strip() for o in failed}),
        "sent_after_recovery": len(after),
        "new_scorer_pid": new_scorer,
        "readyz_probes_sent_answered_status": [(round(a, 2), round(b, 2), c) for a, b, c in readyz],
    }
    passed = (
        bool(recovered)
        and new_scorer != victim.pid
        and recovered[0] <= args.max_recovery_s
        and not failed
        and bool(after)
    )
    figures["verdict"] = "PASS" if passed else "FAIL"
    write("sigkill", figures)
    return passed


def rss_mb(server: ServerProcess) -> float:
    assert server.process is not None, "start() first"
    processes = [psutil.Process(server.process.pid), *server.workers()]
    return sum(p.memory_info().rss for p in processes) / 2**20


async def open_loop_sampling_rss(
    server: ServerProcess, rate: float, seconds: float, traffic: Traffic
) -> list[tuple[float, float]]:
    """``open_loop`` while sampling the servers' RSS every 5 s: (seconds, MB) pairs."""
    samples: list[tuple[float, float]] = []
    load = asyncio.create_task(open_loop(server.url, rate, seconds, traffic))
    start = time.monotonic()
    while not load.done():
        samples.append((round(time.monotonic() - start, 1), round(rss_mb(server), 1)))
        await asyncio.sleep(5)
    await load
    return samples


def rss_growth(samples: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Mean RSS of the second quarter (after warm-up) and of the last one, and the growth %."""
    quarter = max(1, len(samples) // 4)
    early = statistics.mean(r for _, r in samples[quarter : 2 * quarter] or samples)
    late = statistics.mean(r for _, r in samples[-quarter:])
    return early, late, (late - early) / early * 100


def soak(server: ServerProcess, args: argparse.Namespace) -> bool:
    traffic = Traffic()
    seconds = args.soak_seconds
    samples = asyncio.run(open_loop_sampling_rss(server, args.soak_rate, seconds, traffic))
    early, late, growth = rss_growth(samples)
    figures = {
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "seconds": args.soak_seconds,
        "rate_rps": args.soak_rate,
        "sent": len(traffic.records),
        "ok": len(traffic.by(200)),
        "shed": sum(is_shed(o) for o in traffic.records),
        "failed": sum(is_failure(o) for o in traffic.records),
        "rss_mb_second_quarter_mean": round(early, 1),
        "rss_mb_last_quarter_mean": round(late, 1),
        "rss_growth_pct": round(growth, 2),
        "rss_samples": samples,
    }
    passed = growth < args.max_rss_growth_pct and figures["failed"] == 0
    figures["verdict"] = "PASS" if passed else "FAIL"
    write("soak", figures)
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="+", choices=["overload", "sigkill", "soak", "all"])
    parser.add_argument("--in-flight", type=int, default=4, help="CLIP_MAX_IN_FLIGHT served")
    parser.add_argument("--capacity-seconds", type=float, default=30)
    parser.add_argument("--overload-seconds", type=float, default=300)  # 5 min at 2x
    parser.add_argument(
        "--latency-budget-ms",
        type=float,
        default=ClipSettings().max_latency_ms,
        help="p99 of accepted requests must stay within it (default: CLIP_MAX_LATENCY_MS)",
    )
    parser.add_argument("--max-overload-rss-growth-pct", type=float, default=5.0)
    parser.add_argument("--max-recovery-s", type=float, default=15.0)
    # Below capacity on a small CPU machine; raise them on a GPU.
    parser.add_argument("--kill-rate", type=float, default=0.5)
    parser.add_argument("--kill-seconds", type=float, default=120)
    parser.add_argument("--soak-rate", type=float, default=0.5)
    parser.add_argument("--soak-seconds", type=float, default=600)
    parser.add_argument("--max-rss-growth-pct", type=float, default=10.0)
    args = parser.parse_args(argv)

    home = bentoml_home()
    if not (home / "models" / "clip-vit-b-32" / "latest").is_file():
        print(f"saving RANDOM-INIT ViT-B-32 into {home}", flush=True)
        save_random_init_models(home, ["ViT-B-32"])
    env = {"CLIP_MODELS": "ViT-B-32", "CLIP_MAX_IN_FLIGHT": str(args.in_flight)}
    log = Path(tempfile.mkdtemp(prefix="faults-")) / "serve.log"
    server = ServerProcess(home, log, env).start()
    checks = {"overload": overload, "soak": soak, "sigkill": sigkill}  # sigkill last: it disturbs
    selected = list(checks) if "all" in args.checks else args.checks
    verdicts: dict[str, bool] = {}
    try:
        for name in selected:
            print(f"== {name}", flush=True)
            verdicts[name] = checks[name](server, args)
    finally:
        server.stop()
        print(f"(server log: {log})")
    for name, passed in verdicts.items():
        print(f"{name}: {'PASS' if passed else 'FAIL'}")
    return 0 if verdicts and all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
