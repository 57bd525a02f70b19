#!/usr/bin/env python
"""HTTP load for scripts/benchmark.py, from processes of its own (neither the measuring script's
nor the server's): the generator must not share their cores' GIL or be the bottleneck unseen.

Two shapes:
  open    requests sent at a fixed arrival rate whatever the answers do; a latency is measured
          from the request's *scheduled* time, so a stalled server cannot hide its queue
          (no coordinated omission); requests still unanswered at the end count as failures
  closed  N clients, each sending its next request when the last one is answered (throughput)

Each process reports its CPU time and how late it sent requests: a generator that was busy for
most of the run, or sent late, is named in the report as a possible bottleneck.

    python scripts/loadgen.py SPEC_JSON     # one generator process; prints its result as JSON
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A generator process that used more CPU than this share of the run's wall time may be what
# limited the figures (one event loop, one core).
BUSY_CPU_SHARE = 0.8
# Replaced in a body by a number unique to the request (unique captions defeat the text cache).
UNIQUE_MARKER = b"@@N@@"
# Open loop: a p99 send lag above this means the generator fell behind its schedule.
LATE_SEND_MS = 5.0


@dataclass
class LoadResult:
    """All generator processes of one run, merged."""

    latencies_s: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    elapsed_s: float = 0.0
    generator_cpu_share: float = 0.0  # the busiest process
    send_lag_p99_ms: float = 0.0  # open loop only

    @property
    def generator_limited(self) -> bool:
        return self.generator_cpu_share > BUSY_CPU_SHARE or self.send_lag_p99_ms > LATE_SEND_MS

    def failure_text(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items()))


def run_load(
    url: str,
    bodies: list[bytes],
    *,
    mode: str,
    seconds: float,
    processes: int,
    rate: float = 0.0,
    clients: int = 0,
    timeout_s: float = 120.0,
) -> LoadResult:
    """``processes`` generator processes against ``url`` (POST, JSON bodies), merged."""
    processes = max(1, min(processes, clients or processes))
    with tempfile.TemporaryDirectory(prefix="clip-loadgen-") as folder:
        bodies_path = Path(folder) / "bodies.jsonl"
        # JSON bodies hold no raw newline, so one per line.
        bodies_path.write_bytes(b"\n".join(bodies))
        start_at = time.time() + 2.0  # every process imports, connects, then starts together
        commands = []
        for index in range(processes):
            spec = {
                "url": url,
                "bodies": str(bodies_path),
                "mode": mode,
                "seconds": seconds,
                "rate": rate / processes,
                "clients": clients // processes + (index < clients % processes),
                "start_at": start_at + (index / rate if mode == "open" and rate else 0.0),
                "offset": index,
                "timeout_s": timeout_s,
            }
            commands.append([sys.executable, __file__, json.dumps(spec)])
        running = [subprocess.Popen(c, stdout=subprocess.PIPE) for c in commands]
        outputs = [p.communicate()[0] for p in running]
    result = LoadResult()
    lags: list[float] = []
    for process, output in zip(running, outputs, strict=True):
        if process.returncode != 0:
            result.failures["generator process failed"] += 1
            continue
        part = json.loads(output)
        result.latencies_s += part["latencies_s"]
        result.failures.update(part["failures"])
        result.sent += part["sent"]
        result.elapsed_s = max(result.elapsed_s, part["elapsed_s"])
        result.generator_cpu_share = max(result.generator_cpu_share, part["cpu_share"])
        lags += part["send_lags_s"]
    if lags:
        lags.sort()
        result.send_lag_p99_ms = round(lags[min(len(lags) - 1, int(0.99 * len(lags)))] * 1e3, 2)
    return result


# -- one generator process ----------------------------------------------------------------------


async def _generate(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    bodies = Path(spec["bodies"]).read_bytes().split(b"\n")
    latencies: list[float] = []
    lags: list[float] = []
    failures: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=spec["timeout_s"])
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(body: bytes, scheduled: float) -> None:
            if UNIQUE_MARKER in body:
                number = f"{spec['offset']}-{time.perf_counter_ns()}".encode()
                body = body.replace(UNIQUE_MARKER, number)
            try:
                async with session.post(spec["url"], data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append(time.perf_counter() - scheduled)
                    else:
                        failures[f"HTTP {response.status}"] += 1
            except TimeoutError:
                failures["timeout"] += 1
            except aiohttp.ClientError as error:
                failures[type(error).__name__] += 1

        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        cpu_started = _cpu_s()
        started = time.perf_counter()
        stop = started + spec["seconds"]
        sent = 0
        if spec["mode"] == "open":
            interval = 1.0 / spec["rate"]
            tasks = []
            while (scheduled := started + sent * interval) < stop:
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(time.perf_counter() - scheduled)
                body = bodies[(spec["offset"] + sent) % len(bodies)]
                tasks.append(asyncio.create_task(send(body, scheduled)))
                sent += 1
            await asyncio.gather(*tasks)  # unanswered ones end as timeouts: failures
        else:

            async def client(index: int) -> None:
                nonlocal sent
                while time.perf_counter() < stop:
                    body = bodies[index % len(bodies)]
                    index += spec["clients"]
                    sent += 1
                    await send(body, time.perf_counter())

            await asyncio.gather(*(client(spec["offset"] + i) for i in range(spec["clients"])))
        elapsed = time.perf_counter() - started
        cpu = _cpu_s() - cpu_started
    return {
        "latencies_s": latencies,
        "failures": dict(failures),
        "sent": sent,
        "elapsed_s": elapsed,
        "cpu_share": round(cpu / elapsed, 3) if elapsed else 0.0,
        "send_lags_s": lags,
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_generate(json.loads(sys.argv[1])))))
