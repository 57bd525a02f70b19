"""What one request costs the HTTP front end: CPU per stage in-process, and CPU and memory per
process of a served instance.

Two parts, both printed as JSON:

* ``stages``: the front end's work for one `/single` pair, stage by stage, timed in this process
  with ``time.process_time`` over many repetitions: JSON parse, base64, header + decode, resize
  + crop, the pickling of the job for the hop to the model worker (BentoML pickles it) and its
  size. (Tokenization happens on the model worker; its cost is printed for reference.)
* ``served``: `bentoml serve` of random-init ViT-B-32 with one HTTP worker; after a warm-up,
  ``--requests`` `/single` requests at ``--clients`` concurrency. For each process: CPU seconds
  per request (user + system, from psutil), RSS and USS after the load, and whether torch's
  library is mapped into it.

Usage: ``BENTOML_HOME=... python -m scripts.measure_front_end [--skip-served]`` (the home needs
ViT-B-32 saved, e.g. ``python -m scripts.save_models --models ViT-B-32 --random-init``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from clip_runtime.image_inputs import decode_image_field, decode_pixels, open_header
from clip_runtime.jobs import Job
from clip_runtime.preprocessing import Preprocessing
from clip_runtime.settings import ClipSettings
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ServerProcess, model_folder

MODEL = "ViT-B-32"
STORE_NAME = "clip-vit-b-32"
SINGLE = "/evaluator/v1/evaluation/single"
CAPTION = "a photo of a red bus parked beside a brick building on a rainy afternoon"


def cpu_ms(function: Callable[[], object], repeat: int) -> float:
    """Mean CPU milliseconds of one call (this thread's CPU time, not wall time)."""
    function()  # first call: caches, lazy imports
    started = time.process_time()
    for _ in range(repeat):
        function()
    return (time.process_time() - started) * 1000 / repeat


def measure_stages(folder: Path, width: int, height: int, repeat: int) -> dict[str, Any]:
    settings = ClipSettings(models=[MODEL], decode_workers=1)
    preprocessing = Preprocessing(settings, {MODEL: folder})
    cropper = preprocessing.preprocessors[MODEL]  # waits for the build
    data = jpeg_bytes(1, width, height)
    body = json.dumps({"image": b64(data), "text": CAPTION}).encode()
    field = json.loads(body)["image"]
    header = open_header(data, cropper.limits)
    rgb = decode_pixels(open_header(data, cropper.limits))
    job = Job(MODEL, image=preprocessing.image(MODEL, data), text=CAPTION)
    stages = {
        "json parse": cpu_ms(lambda: json.loads(body), repeat),
        "base64 decode": cpu_ms(
            lambda: decode_image_field(field, settings.max_image_bytes), repeat
        ),
        "header checks": cpu_ms(lambda: open_header(data, cropper.limits), repeat),
        "decode (draft) to RGB": cpu_ms(
            lambda: decode_pixels(cropper.draft(open_header(data, cropper.limits))), repeat
        ),
        "resize + crop": cpu_ms(lambda: cropper.crop(rgb), repeat),
        "job pickle (hop)": cpu_ms(lambda: pickle.dumps([job]), repeat),
    }
    del header
    torch_imported = "torch" in sys.modules  # before the tokenizer below imports it
    from clip_runtime.tokens import TextTokenizer

    tokenizer = TextTokenizer(folder)
    return {
        "image": f"{width}x{height} JPEG, {len(data)} bytes, base64 {len(field)} chars",
        "cpu_ms": {name: round(value, 3) for name, value in stages.items()},
        "cpu_ms_total": round(sum(stages.values()), 3),
        "job_pickle_bytes": len(pickle.dumps([job])),
        "crop_dtype": str(getattr(job.image, "dtype", type(job.image).__name__)),
        "tokenize_cpu_ms_reference": round(cpu_ms(lambda: tokenizer.tokenize(CAPTION), repeat), 3),
        "torch_imported_by_front_end_modules": torch_imported,
    }


def _kind(process: psutil.Process) -> str:
    line = " ".join(process.cmdline())
    return "model worker" if "clip-scorer" in line else "front end"


def _process_cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _maps_torch(process: psutil.Process) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return False


async def _load(url: str, bodies: list[bytes], clients: int) -> list[int]:
    statuses: list[int] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def user() -> None:
            while not queue.empty():
                response = await client.post(SINGLE, content=queue.get_nowait(), headers=headers)
                statuses.append(response.status_code)

        await asyncio.gather(*(user() for _ in range(clients)))
    return statuses


def measure_served(home: Path, requests: int, clients: int, width: int, height: int) -> dict:
    images = [b64(jpeg_bytes(seed, width, height)) for seed in range(8)]
    bodies = [
        json.dumps({"image": images[i % 8], "text": f"{CAPTION} {i}"}).encode()
        for i in range(requests)
    ]
    env = {"CLIP_MODELS": MODEL, "CLIP_HTTP_WORKERS": "1", "CLIP_MAX_LATENCY_MS": "120000"}
    with tempfile.TemporaryDirectory() as logs:
        server = ServerProcess(home, Path(logs) / "serve.log", env)
        server.start()
        try:
            asyncio.run(_load(server.url, bodies[:32], clients))  # warm-up
            workers = server.workers()
            before = {w.pid: _process_cpu(w) for w in workers}
            started = time.perf_counter()
            statuses = asyncio.run(_load(server.url, bodies, clients))
            wall = time.perf_counter() - started
            processes = []
            for worker in workers:
                memory = worker.memory_full_info()
                processes.append(
                    {
                        "kind": _kind(worker),
                        "cpu_ms_per_request": round(
                            (_process_cpu(worker) - before[worker.pid]) * 1000 / requests, 2
                        ),
                        "rss_mb": round(memory.rss / 1e6, 1),
                        "uss_mb": round(memory.uss / 1e6, 1),
                        "torch_mapped": _maps_torch(worker),
                    }
                )
        finally:
            server.stop()
    return {
        "requests": requests,
        "clients": clients,
        "ok": statuses.count(200),
        "pairs_per_s": round(requests / wall, 2),
        "processes": sorted(processes, key=lambda p: p["kind"]),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=200, help="repetitions per stage")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--skip-served", action="store_true")
    args = parser.parse_args(argv)
    home = Path(os.environ["BENTOML_HOME"])
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": psutil.cpu_count(),
        "stages": measure_stages(
            model_folder(home, STORE_NAME), args.width, args.height, args.repeat
        ),
    }
    if not args.skip_served:
        result["served"] = measure_served(
            home, args.requests, args.clients, args.width, args.height
        )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
