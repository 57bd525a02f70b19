"""The load generator of the benchmark and the fault checks: HTTP load from processes of its
own (neither the measuring script's nor the server's), so it shares neither's GIL and is not the
bottleneck unseen.

Two shapes:
  open    requests sent at a fixed arrival rate whatever the answers do; a latency is measured
          from the request's *scheduled* time, so a stalled server cannot hide its queue
          (no coordinated omission); requests still unanswered at the end count as failures
  closed  N clients, each sending its next request when the last one is answered (throughput)

Every request is recorded (when it was due, status, latency, Retry-After, error code), so the
fault checks can judge each answer. Each process reports its CPU time and how late it sent
requests: a generator that was busy for most of the run, or sent late, is named in the report as
a possible bottleneck.

    python -m clip_testkit.loadgen SPEC_JSON   # one generator process; prints its result as JSON
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

from clip_testkit.latency import percentile

ROOT = Path(__file__).resolve().parents[1]

# A generator process that used more CPU than this share of the run's wall time may be what
# limited the figures (one event loop, one core).
BUSY_CPU_SHARE = 0.8
# Replaced in a body by a number unique to the request (unique captions defeat the text cache).
UNIQUE_MARKER = b"@@N@@"
# Open loop: a p99 send lag above this means the generator fell behind its schedule.
LATE_SEND_MS = 5.0
# Seconds from the call to the first request: every process imports, connects, then starts.
START_DELAY_S = 2.0


def error_code(body: str | bytes) -> str | None:
    """``code`` of the error envelope ``{"error": {"code": ...}}``; None when there is none."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


@dataclass
class RequestRecord:
    """One request sent: when it was due (``time.monotonic()``: one clock for every process on a
    Linux host), its status (0: no answer), seconds to the answer counted from when it was due,
    Retry-After, the error envelope's code, and for no answer what went wrong."""

    sent_at: float
    status: int
    latency_s: float
    retry_after: str | None = None
    code: str | None = None
    error: str | None = None

    @property
    def answered_at(self) -> float:
        return self.sent_at + self.latency_s

    @property
    def failure(self) -> str | None:
        """How it failed, as the benchmark counts it; None for a 200."""
        if self.status == 200:
            return None
        return f"HTTP {self.status}" if self.status else self.error or "no answer"


@dataclass
class LoadResult:
    """All generator processes of one run, merged."""

    records: list[RequestRecord] = field(default_factory=list)
    failed_generators: int = 0
    sent: int = 0
    elapsed_s: float = 0.0
    generator_cpu_share: float = 0.0  # the busiest process
    send_lag_p99_ms: float = 0.0  # open loop only

    @property
    def latencies_s(self) -> list[float]:
        """Of the requests answered 200."""
        return [r.latency_s for r in self.records if r.status == 200]

    @property
    def failures(self) -> Counter[str]:
        """Failed requests by kind, and generator processes that failed."""
        kinds = Counter(r.failure for r in self.records if r.failure is not None)
        if self.failed_generators:
            kinds["generator process failed"] = self.failed_generators
        return kinds

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
        start_at = time.time() + START_DELAY_S
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
            commands.append([sys.executable, "-m", "clip_testkit.loadgen", json.dumps(spec)])
        running = [subprocess.Popen(c, stdout=subprocess.PIPE, cwd=ROOT) for c in commands]
        outputs = [p.communicate()[0] for p in running]
    result = LoadResult()
    lags: list[float] = []
    for process, output in zip(running, outputs, strict=True):
        if process.returncode != 0:
            result.failed_generators += 1
            continue
        part = json.loads(output)
        result.records += [RequestRecord(*record) for record in part["records"]]
        result.sent += part["sent"]
        result.elapsed_s = max(result.elapsed_s, part["elapsed_s"])
        result.generator_cpu_share = max(result.generator_cpu_share, part["cpu_share"])
        lags += part["send_lags_s"]
    if lags:
        result.send_lag_p99_ms = round((percentile(lags, 0.99) or 0.0) * 1e3, 2)
    result.records.sort(key=lambda r: r.sent_at)
    return result


# -- one generator process ----------------------------------------------------------------------


async def _generate(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    bodies = Path(spec["bodies"]).read_bytes().split(b"\n")
    records: list[list[Any]] = []  # RequestRecord fields
    lags: list[float] = []
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
                    answer = await response.read()
                    status, retry_after = response.status, response.headers.get("retry-after")
                    code = None if status == 200 else error_code(answer)
                    records.append([scheduled, status, time.monotonic() - scheduled])
                    records[-1] += [retry_after, code, None]
            except TimeoutError:
                records.append([scheduled, 0, time.monotonic() - scheduled, None, None, "timeout"])
            except aiohttp.ClientError as error:
                kind = type(error).__name__
                records.append([scheduled, 0, time.monotonic() - scheduled, None, None, kind])

        await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
        cpu_started = _cpu_s()
        started = time.monotonic()
        stop = started + spec["seconds"]
        sent = 0
        if spec["mode"] == "open":
            interval = 1.0 / spec["rate"]
            tasks = []
            while (scheduled := started + sent * interval) < stop:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(time.monotonic() - scheduled)
                body = bodies[(spec["offset"] + sent) % len(bodies)]
                tasks.append(asyncio.create_task(send(body, scheduled)))
                sent += 1
            await asyncio.gather(*tasks)  # unanswered ones end as timeouts: failures
        else:

            async def client(index: int) -> None:
                nonlocal sent
                while time.monotonic() < stop:
                    body = bodies[index % len(bodies)]
                    index += spec["clients"]
                    sent += 1
                    await send(body, time.monotonic())

            await asyncio.gather(*(client(spec["offset"] + i) for i in range(spec["clients"])))
        elapsed = time.monotonic() - started
        cpu = _cpu_s() - cpu_started
    return {
        "records": records,
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
