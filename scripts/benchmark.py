#!/usr/bin/env python
"""One run, one machine, one JPEG set: the hardware ceiling, the in-process pipeline, the naive
per-pair baseline and the running service over HTTP, side by side.

    python scripts/benchmark.py --quick --models ViT-B-32          # what `make bench-quick` runs
    python scripts/benchmark.py --url http://host:3000              # an already running service

Measurements, per model (all on the same 640x480 ~100 KB photo-like JPEGs, 8 repeated prompts):
  ceiling    encoder only (image tower, pre-made pixels), batch 256 (--quick: 32)
  pipeline   in-process bytes -> score (ClipEngine.run: decode pool + batched model)
  tensor     the same through the tensor decode path (CLIP_GPU_DECODE=on; nvjpeg on CUDA)
  naive      one pair at a time: PIL + open_clip transform, encode image, encode text, fp32
  service    `bentoml serve` over HTTP: single at concurrency 1/16/64, batch of 32 and 256 items
It prints JSON, writes it to --json, and appends a markdown table to --markdown. Figures are
throughput of closed-loop clients; the load generator runs on the same machine (and cores).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import httpx
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip_runtime import ClipEngine, ClipSettings, Job  # noqa: E402
from clip_runtime.device import resolve_device  # noqa: E402
from clip_runtime.images import ImageLimits  # noqa: E402
from clip_runtime.model import ClipModel  # noqa: E402
from clip_runtime.model_entry import store_name  # noqa: E402
from clip_runtime.tensor_decode import TensorPreprocessor  # noqa: E402
from clip_testkit.images import jpeg_bytes  # noqa: E402
from clip_testkit.server import (  # noqa: E402
    ServerProcess,
    model_folder,
    save_random_init_models,
)

PROMPTS = [f"a photo of a {thing}" for thing in ("cat", "dog", "bridge", "car", "tree", "cake")]
PROMPTS += ["two people on a beach at sunset", "a diagram of a neural network"]
LIMITS = ImageLimits(max_image_bytes=16 << 20, max_image_pixels=40_000_000, min_image_side=4)


@dataclass
class Row:
    """One measurement: throughput, latency percentiles (ms, per call), memory."""

    model: str
    name: str
    pairs_s: float
    calls: int
    pairs_per_call: int
    concurrency: int = 1
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    vs_naive: float | None = None
    vs_ceiling: float | None = None
    note: str = ""


@dataclass
class Config:
    quick: bool
    ceiling_batch: int
    ceiling_reps: int
    pipeline_pairs: int
    naive_pairs: int
    seconds: float
    batch_seconds: float
    batch_sizes: tuple[int, ...] = (32, 256)
    extra: dict[str, Any] = field(default_factory=dict)


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 1)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99)}


def tree_rss(process: psutil.Process) -> int:
    """RSS of a process and its children (shared pages count once per process: an upper bound)."""
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        with suppress(psutil.Error):  # a worker may exit between listing and reading
            total += proc.memory_info().rss
    return total


class PeakSampler:
    """Peak RSS of a process tree (and GPU memory in use), sampled every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.process))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakSampler:
        self.peak = tree_rss(self.process)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.process))


@contextmanager
def gpu_peak(device: torch.device) -> Iterator[dict[str, float | None]]:
    result: dict[str, float | None] = {"mb": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["mb"] = torch.cuda.max_memory_allocated(device) / 2**20


def mb(value: int) -> float:
    return round(value / 2**20, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- in-process --------------------------------------------------------------------------------


def measure_ceiling(model: ClipModel, config: Config) -> Row:
    """Image tower only, on pixels already on the device: what the hardware allows."""
    height, width = model.preprocessor.size
    pixels = torch.randn(config.ceiling_batch, 3, height, width, device=model.device)
    model.encode_pixels(pixels)  # warm-up (kernels, allocator)
    sync(model.device)
    times = []
    with PeakSampler(os.getpid()) as rss, gpu_peak(model.device) as gpu:
        for _ in range(config.ceiling_reps):
            started = time.perf_counter()
            model.encode_pixels(pixels)
            sync(model.device)
            times.append(time.perf_counter() - started)
    return Row(
        model=model.info.name,
        name=f"ceiling: image encoder only, batch {config.ceiling_batch}",
        pairs_s=round(config.ceiling_batch * len(times) / sum(times), 3),
        calls=len(times),
        pairs_per_call=config.ceiling_batch,
        peak_rss_mb=mb(rss.peak),
        peak_gpu_mb=gpu["mb"],
        **percentiles(times),
    )


def measure_pipeline(
    engine: ClipEngine, name: str, pairs: list[tuple[bytes, str]], label: str
) -> Row:
    """bytes -> scores in process, in calls of max_batch_size pairs."""
    step = engine.settings.max_batch_size
    device = engine.models[name].device
    jobs = [Job(name, image=data, text=text) for data, text in pairs]
    engine.run(jobs[: min(step, 8)])  # warm-up
    times = []
    with PeakSampler(os.getpid()) as rss, gpu_peak(device) as gpu:
        for start in range(0, len(jobs), step):
            started = time.perf_counter()
            engine.run(jobs[start : start + step])
            times.append(time.perf_counter() - started)
    return Row(
        model=name,
        name=label,
        pairs_s=round(len(pairs) / sum(times), 3),
        calls=len(times),
        pairs_per_call=min(step, len(pairs)),
        peak_rss_mb=mb(rss.peak),
        peak_gpu_mb=gpu["mb"],
        note=f"decode workers {engine.settings.decode_workers}",
        **percentiles(times),
    )


def measure_naive(
    folder: Path, name: str, pairs: list[tuple[bytes, str]], device: torch.device
) -> Row:
    """The seed's per-request work: decode, transform, encode one image and one text, fp32."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")

    def one(data: bytes, text: str) -> float:
        with torch.no_grad():
            pixels = preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)
            image = model.encode_image(pixels.to(device), normalize=True)
            caption = model.encode_text(tokenizer([text]).to(device), normalize=True)
            return float((image * caption).sum())

    one(*pairs[0])  # warm-up
    times = []
    with PeakSampler(os.getpid()) as rss, gpu_peak(device) as gpu:
        for data, text in pairs:
            started = time.perf_counter()
            one(data, text)
            times.append(time.perf_counter() - started)
    return Row(
        model=name,
        name="naive: one pair per call, fp32, no batching, no cache",
        pairs_s=round(len(times) / sum(times), 3),
        calls=len(times),
        pairs_per_call=1,
        peak_rss_mb=mb(rss.peak),
        peak_gpu_mb=gpu["mb"],
        **percentiles(times),
    )


def agreement(model: ClipModel, images: list[bytes]) -> dict[str, float]:
    """How far the tensor decode path is from the PIL path on this model and these images."""
    tensor = TensorPreprocessor(model.entry.preprocess_cfg, LIMITS, model.device)
    pil_crops = [model.preprocessor.from_bytes(data) for data in images]
    uint8 = tensor.crop(tensor.decode(images))
    pil_uint8 = torch.stack([torch.tensor(crop).permute(2, 0, 1) for crop in pil_crops])
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    keep = [False] * len(images)
    pil_cos = np.array([o.cosine for o in model.run(pil_crops, texts, keep)])
    tensor_cos = np.array([o.cosine for o in model.run(list(uint8), texts, keep)])
    return {
        "max_abs_uint8_levels": int((pil_uint8.to(uint8.device).int() - uint8.int()).abs().max()),
        "max_abs_cosine": float(np.abs(pil_cos - tensor_cos).max()),
    }


# -- over HTTP ---------------------------------------------------------------------------------


async def closed_loop(
    url: str, bodies: list[bytes], concurrency: int, seconds: float
) -> tuple[list[float], int, float]:
    """``concurrency`` clients, each sending its next body as soon as the last one answered."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(index: int) -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                body = bodies[index % len(bodies)]
                index += concurrency
                started = time.perf_counter()
                response = await client.post(
                    url, content=body, headers={"content-type": "application/json"}
                )
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def scrape(base_url: str, model: str) -> dict[str, float]:
    """Batch and cache counters from the service's Prometheus text (for deltas around a run)."""
    wanted = {
        "clip_model_batch_items_sum": "batch_items",
        "clip_model_batch_items_count": "batches",
        "clip_text_cache_total": "cache",
    }
    values: dict[str, float] = {}
    try:
        text = httpx.get(base_url + "/evaluator/metrics", timeout=120).text
    except httpx.HTTPError as error:
        print(f"metrics scrape failed: {error!r}", file=sys.stderr)
        return values
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) not in wanted:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if labels.get("model") != model:
            continue
        key = wanted[match.group(1)]
        if key == "cache":
            key = "cache_" + labels.get("result", "")
        values[key] = values.get(key, 0.0) + float(match.group(3))
    return values


def measure_service(
    base_url: str,
    name: str,
    images_b64: list[str],
    config: Config,
    server_pid: int | None,
    naive: float,
    ceiling: float,
) -> tuple[list[Row], dict[str, float]]:
    single = [
        json.dumps(
            {
                "image": images_b64[i % len(images_b64)],
                "text": PROMPTS[i % len(PROMPTS)],
                "model": name,
            }
        ).encode()
        for i in range(len(images_b64) * 2)
    ]

    def batch_bodies(size: int) -> list[bytes]:
        return [
            json.dumps(
                {
                    "model": name,
                    "items": [
                        {
                            "image": images_b64[(j + k) % len(images_b64)],
                            "text": PROMPTS[k % len(PROMPTS)],
                        }
                        for k in range(size)
                    ],
                }
            ).encode()
            for j in range(4)
        ]

    plans: list[tuple[str, str, list[bytes], int, int, float]] = [
        ("single", "/evaluator/v1/evaluation/single", single, c, 1, config.seconds)
        for c in (1, 16, 64)
    ]
    for size in config.batch_sizes:
        plans.append(
            (
                "batch",
                "/evaluator/v1/evaluation/batch",
                batch_bodies(size),
                1,
                size,
                config.batch_seconds,
            )
        )
    before = scrape(base_url, name)
    # Warm-up: first requests pay for connection set-up and lazy paths.
    _, warm_up_errors, _ = asyncio.run(closed_loop(base_url + plans[0][1], single, 4, 2.0))
    rows = []
    for kind, path, bodies, concurrency, per, seconds in plans:
        sampler = PeakSampler(server_pid) if server_pid else None
        if sampler:
            sampler.__enter__()
        latencies, errors, elapsed = asyncio.run(
            closed_loop(base_url + path, bodies, concurrency, seconds)
        )
        if sampler:
            sampler.__exit__()
        pairs_s = round(len(latencies) * per / elapsed, 3)
        rows.append(
            Row(
                model=name,
                name=f"service {kind}: {per} pair(s)/request, {concurrency} client(s)",
                pairs_s=pairs_s,
                calls=len(latencies),
                pairs_per_call=per,
                concurrency=concurrency,
                errors=errors,
                peak_rss_mb=mb(sampler.peak) if sampler else None,
                vs_naive=round(pairs_s / naive, 2) if naive else None,
                vs_ceiling=round(pairs_s / ceiling, 3) if ceiling else None,
                note="server process tree" if sampler else "",
                **percentiles(latencies),
            )
        )
        print(json.dumps(asdict(rows[-1])), flush=True)
    after = scrape(base_url, name)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    # Failures right after /readyz are a finding, not noise: report them.
    counters: dict[str, float] = {"errors in the 2 s warm-up (4 clients)": warm_up_errors}
    if delta.get("batches"):
        counters["mean pairs per model batch"] = round(delta["batch_items"] / delta["batches"], 1)
    lookups = delta.get("cache_hit", 0.0) + delta.get("cache_miss", 0.0)
    if lookups:
        counters["text cache hit rate"] = round(delta.get("cache_hit", 0.0) / lookups, 3)
    return rows, counters


# -- the run -----------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    import bentoml
    import open_clip
    import torchvision

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "bentoml": bentoml.__version__,
        "device": str(device),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"## {result['started']} — {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}",
        "",
        f"- Command: `{result['command']}`",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gb']} GB; {m['platform']}; "
        f"load average {m['load_avg_start']} at start, {m.get('load_avg_end')} at end",
        f"- Versions: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"open_clip {m['open_clip']}, bentoml {m['bentoml']}",
        f"- Weights: {result['weights']}; images: {result['images']}",
    ]
    if result.get("notes"):
        lines.append(f"- Notes: {result['notes']}")
    lines += [
        "",
        "| Model | Measurement | pairs/s | p50 ms | p95 ms | p99 ms | errors | peak RSS MB "
        "| peak GPU MB | vs naive | vs ceiling |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    for row in result["rows"]:
        lines.append(
            "| "
            + " | ".join(
                cell(row[key])
                for key in (
                    "model",
                    "name",
                    "pairs_s",
                    "p50_ms",
                    "p95_ms",
                    "p99_ms",
                    "errors",
                    "peak_rss_mb",
                    "peak_gpu_mb",
                    "vs_naive",
                    "vs_ceiling",
                )
            )
            + " |"
        )
    lines.append("")
    for name, summary in result["summary"].items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    lines.append("")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--quick", action="store_true", help="small counts (CPU, smoke runs)")
    parser.add_argument("--url", help="measure this running service instead of starting one")
    parser.add_argument("--no-service", action="store_true", help="in-process figures only")
    parser.add_argument(
        "--bentoml-home",
        type=Path,
        help="model store with the models saved (default: $BENTOML_HOME, else a temporary store "
        "with random-init weights, seed 0)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks-latest.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--notes", default="", help="free text for the report (load, sharing)")
    parser.add_argument("--seconds", type=float, help="seconds per HTTP measurement")
    parser.add_argument("--pairs", type=int, help="pairs for the in-process pipeline")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[32, 256],
        help="items per batch request (one 256-item request takes minutes on a loaded CPU)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = (
        Config(True, 16, 2, 32, 8, 10.0, 15.0)
        if args.quick
        else Config(False, 256, 10, 1024, 64, 30.0, 60.0)
    )
    config.seconds = args.seconds or config.seconds
    config.batch_seconds = args.seconds or config.batch_seconds
    config.pipeline_pairs = args.pairs or config.pipeline_pairs
    config.batch_sizes = tuple(args.batch_sizes)

    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    home_env = args.bentoml_home or (
        Path(os.environ["BENTOML_HOME"]) if os.environ.get("BENTOML_HOME") else None
    )
    temporary = None
    if home_env is None:
        temporary = tempfile.TemporaryDirectory(prefix="clip-bench-")
        home_env = Path(temporary.name)
        print(f"saving random-init {args.models} into {home_env}", flush=True)
        save_random_init_models(home_env, args.models)
    folders = {name: model_folder(home_env, store_name(name)) for name in args.models}

    settings = ClipSettings(models=args.models)
    device = resolve_device(settings.device)
    info = machine(device)
    images = [jpeg_bytes(seed) for seed in range(16)]
    images_b64 = [base64.b64encode(data).decode() for data in images]
    pairs = [
        (images[i % len(images)], PROMPTS[i % len(PROMPTS)]) for i in range(config.pipeline_pairs)
    ]
    naive_pairs = pairs[: config.naive_pairs]
    rows: list[Row] = []
    summary: dict[str, dict[str, Any]] = {}
    weights: set[str] = set()

    for name in args.models:
        rss_before = tree_rss(psutil.Process())
        engine = ClipEngine(ClipSettings(models=[name], default_model=name), {name: folders[name]})
        engine.warm_up()
        model = engine.models[name]
        base_rss = mb(tree_rss(psutil.Process()) - rss_before)
        weights.add(model.info.weights_source)
        ceiling = measure_ceiling(model, config)
        rows.append(ceiling)
        print(json.dumps(asdict(ceiling)), flush=True)
        rows.append(measure_pipeline(engine, name, pairs, "in-process pipeline: bytes -> score"))
        print(json.dumps(asdict(rows[-1])), flush=True)
        tensor_engine = ClipEngine(
            ClipSettings(models=[name], default_model=name, gpu_decode="on"), {name: folders[name]}
        )
        rows.append(
            measure_pipeline(tensor_engine, name, pairs, "in-process pipeline, tensor decode path")
        )
        print(json.dumps(asdict(rows[-1])), flush=True)
        agree = agreement(model, images[:8])
        del tensor_engine, engine, model
        naive = measure_naive(folders[name], name, naive_pairs, device)
        rows.append(naive)
        print(json.dumps(asdict(naive)), flush=True)
        for row in rows[-4:]:
            row.vs_naive = round(row.pairs_s / naive.pairs_s, 2)
            row.vs_ceiling = round(row.pairs_s / ceiling.pairs_s, 3)
        summary[name] = {
            "in-process model RSS increment MB": base_rss,
            "tensor-vs-PIL max |d uint8|": agree["max_abs_uint8_levels"],
            "max |d cosine|": f"{agree['max_abs_cosine']:.2e}",
        }

    if not args.no_service:
        server = None
        base_url = args.url
        server_pid = None
        if base_url is None:
            log = Path(tempfile.mkdtemp(prefix="clip-bench-log-")) / "serve.log"
            server = ServerProcess(home_env, log, {"CLIP_MODELS": ",".join(args.models)})
            print(f"starting bentoml serve (log {log})", flush=True)
            server.start()
            base_url = server.url
            assert server.process is not None
            server_pid = server.process.pid
        try:
            idle_rss = mb(tree_rss(psutil.Process(server_pid))) if server_pid else None
            for name in args.models:
                naive_row = next(r for r in rows if r.model == name and r.name.startswith("naive"))
                ceiling_row = next(r for r in rows if r.model == name and r.name.startswith("ceil"))
                service_rows, counters = measure_service(
                    base_url,
                    name,
                    images_b64,
                    config,
                    server_pid,
                    naive_row.pairs_s,
                    ceiling_row.pairs_s,
                )
                rows += service_rows
                summary[name].update(counters)
                c16 = next(r for r in service_rows if r.concurrency == 16 and r.pairs_per_call == 1)
                c64 = next(r for r in service_rows if r.concurrency == 64 and r.pairs_per_call == 1)
                summary[name]["service c16 / naive (CPU target >= 2)"] = c16.vs_naive
                if idle_rss is not None and c64.peak_rss_mb is not None:
                    summary[name]["server tree idle RSS MB"] = idle_rss
                    summary[name]["increment at 64 clients MB"] = round(
                        c64.peak_rss_mb - idle_rss, 1
                    )
        finally:
            if server is not None:
                server.stop()

    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "started": started,
        "command": "python scripts/benchmark.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "weights": ", ".join(sorted(weights)),
        "images": "16 photo-like 640x480 JPEGs (quality 90, ~100 KB), 8 repeated prompts",
        "notes": args.notes,
        "config": asdict(config),
        "rows": [asdict(row) for row in rows],
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        if not args.markdown.exists():
            args.markdown.write_text(
                "# Benchmarks\n\nAppended by `scripts/benchmark.py` (`make bench`); newest last."
                "\n\n"
            )
        with args.markdown.open("a") as out:
            out.write(markdown(result))
    print(markdown(result))
    if temporary is not None:
        temporary.cleanup()
    return result


if __name__ == "__main__":
    main()
