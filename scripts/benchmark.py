#!/usr/bin/env python
"""One run, one machine, one JPEG set: the hardware ceiling, the in-process pipeline, the naive
per-pair baseline and the running service over HTTP, side by side.

    python -m scripts.benchmark --quick --models ViT-B-32          # what `make bench-quick` runs
    python -m scripts.benchmark --url http://host:3000              # an already running service

Measurements, per model (all on the same 640x480 ~100 KB photo-like JPEGs, 8 repeated prompts):
  ceiling    encoder only (image tower, pre-made pixels), batch 256 (--quick: 32)
  pipeline   in-process bytes -> score (ClipEngine.run: decode pool + batched model)
  tensor     the same through the tensor decode path (CLIP_GPU_DECODE=on; nvjpeg on CUDA)
  naive      one pair at a time: PIL + open_clip transform, encode image, encode text, fp32
  service    `bentoml serve` over HTTP: single at concurrency 1/16/64, batch of 32 and 256 items
  runtimes   (--runtimes) per runtime and precision: the encoder ceiling, the in-process
             pipeline and the service at 16 clients, with the first (converting) and the cached
             start of the OpenVINO runtime; --runtimes-only measures these alone
It prints JSON, writes it to --json, and appends a markdown table to --markdown. Figures are
throughput of closed-loop clients; the load generator runs on the same machine (and cores).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard, get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import httpx
import numpy as np
import psutil
import torch

from clip_runtime import ClipEngine, ClipSettings, Job
from clip_runtime.device import resolve_device
from clip_runtime.image_inputs import ImageLimits
from clip_runtime.model import ClipModel
from clip_runtime.model_entry import read_entry, store_name
from clip_runtime.settings import Precision, RuntimeName
from clip_runtime.tensor_decode import TensorPreprocessor
from clip_testkit.latency import latency_percentiles_ms as percentiles
from clip_testkit.loadgen import UNIQUE_MARKER, LoadResult, run_load
from clip_testkit.sample_images import encode, jpeg_bytes, photo_like
from clip_testkit.server import (
    ServerProcess,
    model_folder,
    save_random_init_models,
)

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [f"a photo of a {thing}" for thing in ("cat", "dog", "bridge", "car", "tree", "cake")]
PROMPTS += ["two people on a beach at sunset", "a diagram of a neural network"]
SPEED_FLAGS = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
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
    load: str = ""  # "closed N" clients or "open R/s" arrival rate
    failures: str = ""  # by kind; counted in the percentiles as unbounded latencies
    generator: str = ""  # the load generator's busiest process, and a warning when it limited
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
    batch_clients: int = 4
    idle_rate: float = 2.0  # requests/s of the idle latency runs
    extra: dict[str, Any] = field(default_factory=dict)


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


def measure_ceiling(model: ClipModel, config: Config, batch: int | None = None) -> Row:
    """Image tower only, on pixels already on the device: what the hardware allows."""
    batch = batch or config.ceiling_batch
    height, width = model.preprocessor.size
    pixels = torch.randn(batch, 3, height, width, device=model.device)
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
        name=f"ceiling: image encoder only, batch {batch}",
        pairs_s=round(batch * len(times) / sum(times), 3),
        calls=len(times),
        pairs_per_call=batch,
        peak_rss_mb=mb(rss.peak),
        peak_gpu_mb=gpu["mb"],
        **percentiles(times),
    )


def measure_pipeline(
    engine: ClipEngine, name: str, pairs: Sequence[tuple[bytes, str | None]], label: str
) -> Row:
    """bytes -> scores (or image embeddings, without texts) in process, in calls of the model's
    batch size."""
    step = engine.settings.batch_size_for(name)
    device = engine.models[name].device
    jobs = [Job(name, image=data, text=text) for data, text in pairs]
    engine.run_jobs(jobs[: min(step, 8)])  # warm-up
    times = []
    with PeakSampler(os.getpid()) as rss, gpu_peak(device) as gpu:
        for start in range(0, len(jobs), step):
            started = time.perf_counter()
            engine.run_jobs(jobs[start : start + step])
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


def measure_decode(engine: ClipEngine, name: str, images: list[bytes], label: str) -> Row:
    """Decode + resize + crop alone, no model: Pillow in the engine's decode pool, or the
    tensor path (nvjpeg on CUDA) in chunks, as the engine runs it."""
    model = engine.models[name]
    tensor = engine.tensor_preprocessors.get(name)
    step = engine.settings.decode_chunk_size

    def once() -> None:
        if tensor is None:
            list(engine.decode_pool.map(model.preprocessor.from_bytes, images))
            return
        for start in range(0, len(images), step):
            tensor.crop(tensor.decode(images[start : start + step]))
        sync(model.device)

    once()  # warm-up
    started = time.perf_counter()
    with PeakSampler(os.getpid()) as rss:
        once()
    elapsed = time.perf_counter() - started
    return Row(
        model=name,
        name=label,
        pairs_s=round(len(images) / elapsed, 3),
        calls=1,
        pairs_per_call=len(images),
        peak_rss_mb=mb(rss.peak),
        note="images/s, no model",
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
    pil_cos = np.array([o.cosine for o in model.score_batch(pil_crops, texts, keep)])
    tensor_cos = np.array([o.cosine for o in model.score_batch(list(uint8), texts, keep)])
    return {
        "max_abs_uint8_levels": int((pil_uint8.to(uint8.device).int() - uint8.int()).abs().max()),
        "max_abs_cosine": float(np.abs(pil_cos - tensor_cos).max()),
    }


# -- over HTTP ---------------------------------------------------------------------------------


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


@dataclass
class ServiceInputs:
    """Request images: 640x480 JPEGs, and a mix of sizes (and one PNG: the CPU crop fallback)."""

    standard: list[str]
    mixed: list[str]


def service_inputs(images: list[bytes]) -> ServiceInputs:
    sizes = [(320, 240), (640, 480), (1280, 720), (1920, 1080), (500, 333), (97, 61)]
    mixed = [jpeg_bytes(100 + i, w, h) for i, (w, h) in enumerate(sizes)]
    mixed.append(encode(photo_like(200, 640, 480), "PNG"))

    def b64(items: list[bytes]) -> list[str]:
        return [base64.b64encode(data).decode() for data in items]

    return ServiceInputs(b64(images), b64(mixed))


def single_bodies(name: str, images: list[str], unique: bool = False) -> list[bytes]:
    def text(i: int) -> str:
        prompt = PROMPTS[i % len(PROMPTS)]
        return f"{prompt}, take {UNIQUE_MARKER.decode()}" if unique else prompt

    count = max(len(images), len(PROMPTS)) * 2
    return [
        json.dumps({"image": images[i % len(images)], "text": text(i), "model": name}).encode()
        for i in range(count)
    ]


def batch_bodies(name: str, images: list[str], size: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "model": name,
                "items": [
                    {"image": images[(j + k) % len(images)], "text": PROMPTS[k % len(PROMPTS)]}
                    for k in range(size)
                ],
            }
        ).encode()
        for j in range(4)
    ]


def load_row(
    name: str, label: str, load: LoadResult, per: int, shape: str, rss: float | None
) -> Row:
    failed = sum(load.failures.values())
    pairs_s = round(len(load.latencies_s) * per / load.elapsed_s, 3) if load.elapsed_s else 0.0
    generator = f"busiest process {load.generator_cpu_share:.1%} CPU"
    if load.send_lag_p99_ms:
        generator += f", send lag p99 {load.send_lag_p99_ms} ms"
    if load.generator_limited:  # too few generators, or a machine too busy to send on time
        generator += "; GENERATOR BEHIND: figures may understate the load"
    return Row(
        model=name,
        name=label,
        pairs_s=pairs_s,
        calls=len(load.latencies_s),
        pairs_per_call=per,
        errors=failed,
        peak_rss_mb=rss,
        load=shape,
        failures=load.failure_text() or "0",
        generator=generator,
        note="server process tree RSS" if rss else "",
        **percentiles(load.latencies_s, failed),
    )


@dataclass
class LoadRunner:
    """Runs load shapes against the service for one model, from ``generators`` processes of its
    own, and keeps each row (printed as it comes)."""

    name: str
    server_pid: int | None
    generators: int
    rows: list[Row] = field(default_factory=list)

    def measure(
        self,
        label: str,
        url: str,
        bodies: list[bytes],
        per: int,
        mode: str,
        level: float,
        secs: float,
    ) -> Row:
        sampler = PeakSampler(self.server_pid) if self.server_pid else None
        with sampler or nullcontext():
            load = run_load(
                url,
                bodies,
                mode=mode,
                seconds=secs,
                processes=self.generators,
                rate=level if mode == "open" else 0.0,
                clients=int(level) if mode == "closed" else 0,
            )
        shape = f"open {level:g}/s" if mode == "open" else f"closed {int(level)}"
        rss = mb(sampler.peak) if sampler else None
        row = load_row(self.name, label, load, per, shape, rss)
        self.rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
        return row


def measure_service(
    base_url: str,
    name: str,
    inputs: ServiceInputs,
    config: Config,
    server_pid: int | None,
    generators: int,
) -> tuple[list[Row], dict[str, Any]]:
    """The service over HTTP, the load from ``generators`` processes of its own: closed-loop
    throughput (single at 16 and 64 clients, repeated and unique captions, mixed sizes; the
    batch endpoint at 4 clients), open-loop latency at fixed rates (idle, 50% and 90% of the
    64-client throughput), and the idle latency again after the load."""
    single = base_url + "/evaluator/v1/evaluation/single"
    batch = base_url + "/evaluator/v1/evaluation/batch"
    repeated = single_bodies(name, inputs.standard)
    runner = LoadRunner(name, server_pid, generators)
    measure = runner.measure
    before = scrape(base_url, name)
    # Warm-up: first requests pay for connection set-up and lazy paths; its failures are shown.
    warm = measure("warm-up (not a measurement)", single, repeated, 1, "closed", 4, 2.0)
    idle = measure("single, idle", single, repeated, 1, "open", config.idle_rate, config.seconds)
    c16 = measure("single, repeated prompts", single, repeated, 1, "closed", 16, config.seconds)
    unique = single_bodies(name, inputs.standard, unique=True)
    measure("single, unique captions", single, unique, 1, "closed", 16, config.seconds)
    mixed = single_bodies(name, inputs.mixed)
    measure("single, mixed sizes + a PNG", single, mixed, 1, "closed", 16, config.seconds)
    c64 = measure("single, repeated prompts", single, repeated, 1, "closed", 64, config.seconds)
    capacity = max(c64.pairs_s, c16.pairs_s, 0.5)
    for share in (0.5, 0.9):
        rate = round(capacity * share, 2)
        measure(
            f"single at {share:.0%} of capacity", single, repeated, 1, "open", rate, config.seconds
        )
    for size in config.batch_sizes:
        measure(
            f"batch of {size}",
            batch,
            batch_bodies(name, inputs.standard, size),
            size,
            "closed",
            config.batch_clients,
            config.batch_seconds,
        )
    idle_after = measure(
        "single, idle after the load", single, repeated, 1, "open", config.idle_rate, config.seconds
    )
    counters: dict[str, Any] = {
        "warm-up failures": warm.errors,
        "idle p50 ms before / after load": f"{idle.p50_ms} / {idle_after.p50_ms}",
        "single 16 clients pairs/s": c16.pairs_s,
    }
    counters.update(batching_and_cache(before, scrape(base_url, name)))
    return runner.rows, counters


def batching_and_cache(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The mean model batch and the text cache's hit rate between two scrapes."""
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    figures: dict[str, float] = {}
    if delta.get("batches"):
        figures["mean pairs per model batch"] = round(delta["batch_items"] / delta["batches"], 1)
    lookups = delta.get("cache_hit", 0.0) + delta.get("cache_miss", 0.0)
    if lookups:
        figures["text cache hit rate"] = round(delta.get("cache_hit", 0.0) / lookups, 3)
    return figures


# -- runtimes ----------------------------------------------------------------------------------


def is_runtime(name: str) -> TypeGuard[RuntimeName]:
    return name in get_args(RuntimeName)


def is_precision(name: str) -> TypeGuard[Precision]:
    return name in get_args(Precision)


def runtime_variants(requested: list[str]) -> list[tuple[RuntimeName, Precision]]:
    """(runtime, precision) pairs from RUNTIME-PRECISION names; bf16 only where the CPU has it."""
    from clip_runtime.runtimes import cpu_has_native_bf16

    variants: list[tuple[RuntimeName, Precision]] = []
    for item in requested:
        runtime, _, precision = item.partition("-")
        if not (is_runtime(runtime) and is_precision(precision)):
            runtimes, precisions = ", ".join(get_args(RuntimeName)), ", ".join(get_args(Precision))
            raise SystemExit(f"--runtimes {item}: RUNTIME ({runtimes})-PRECISION ({precisions})")
        if precision == "bf16" and not cpu_has_native_bf16():
            print(f"skipping {item}: this CPU has no native bf16", flush=True)
            continue
        variants.append((runtime, precision))
    return variants


def timed_engine(settings: ClipSettings, folders: dict[str, Path]) -> tuple[ClipEngine, float]:
    started = time.perf_counter()
    engine = ClipEngine(settings, folders)
    engine.warm_up()
    return engine, round(time.perf_counter() - started, 1)


def measure_runtimes(
    name: str,
    folder: Path,
    home: Path,
    images: list[bytes],
    pairs: Sequence[tuple[bytes, str | None]],
    config: Config,
    args: argparse.Namespace,
) -> tuple[list[Row], dict[str, Any]]:
    """Each (runtime, precision) of ``--runtimes``: the image encoder's ceiling (and the
    ``--batch-scan`` sizes), the in-process bytes -> score pipeline, and the service (started
    with that runtime, its default batching) at 16 clients; first and cached OpenVINO starts."""
    from clip_runtime import openvino_runtime

    cache = Path(tempfile.mkdtemp(prefix="clip-bench-ov-cache-"))
    rows: list[Row] = []
    summary: dict[str, Any] = {}
    service: dict[str, float] = {}
    for runtime, precision in runtime_variants(args.runtimes):
        tag = f"{runtime} {precision}"
        settings = ClipSettings(
            models=[name],
            default_model=name,
            runtime=runtime,
            precision=precision,
            runtime_cache_dir=cache,
            gpu_decode="off",
        )
        conversions = openvino_runtime.stats.conversions
        engine, start_s = timed_engine(settings, {name: folder})
        if runtime == "openvino":
            converted = openvino_runtime.stats.conversions > conversions
            summary[f"{tag} start s ({'converting' if converted else 'cached'})"] = start_s
            if converted:
                del engine
                engine, cached_s = timed_engine(settings, {name: folder})
                summary[f"{tag} start s (cached)"] = cached_s
        model = engine.models[name]
        measured = [measure_ceiling(model, config)]
        if runtime == "openvino":  # the scan chooses this runtime's batching settings
            measured += [measure_ceiling(model, config, size) for size in args.batch_scan]
        measured.append(measure_pipeline(engine, name, pairs, "in-process bytes -> score"))
        for row in measured:
            row.name = f"{row.name}, {tag}"
            print(json.dumps(asdict(row)), flush=True)
        rows += measured
        del engine, model
        if not args.no_service:
            env = {"CLIP_RUNTIME": runtime, "CLIP_PRECISION": precision}
            row = runtime_service_row(name, images, home, cache, env, config, args)
            row.name = f"{row.name}, {tag}"
            rows.append(row)
            service[tag] = row.pairs_s
            pipeline = next(r for r in measured if r.name.startswith("in-process"))
            summary[f"{tag} service / in-process pipeline"] = round(
                row.pairs_s / pipeline.pairs_s, 2
            )
    baseline = service.get("torch fp32")
    for tag, value in service.items():
        if baseline and tag != "torch fp32":
            summary[f"{tag} service / torch fp32 service"] = round(value / baseline, 2)
    return rows, summary


def runtime_service_row(
    name: str,
    images: list[bytes],
    home: Path,
    cache: Path,
    env: Mapping[str, str],
    config: Config,
    args: argparse.Namespace,
) -> Row:
    """The service started with ``env`` (a runtime and precision), single pairs at 16 clients."""
    log = Path(tempfile.mkdtemp(prefix="clip-bench-log-")) / "serve.log"
    server_env = {
        "CLIP_MODELS": name,
        "CLIP_HTTP_WORKERS": str(ClipSettings(models=[name]).http_workers),  # the default
        "CLIP_RUNTIME_CACHE_DIR": str(cache),  # the conversion made above, not one per server
        **env,
        **dict(item.split("=", 1) for item in args.server_env),
    }
    server = ServerProcess(home, log, server_env)
    print(f"starting bentoml serve with {env} (log {log})", flush=True)
    server.start()
    try:
        assert server.process is not None
        url = server.url + "/evaluator/v1/evaluation/single"
        bodies = single_bodies(
            name, service_inputs([jpeg_bytes(seed) for seed in range(16)]).standard
        )
        run_load(url, bodies, mode="closed", seconds=2.0, processes=args.generators, clients=4)
        sampler = PeakSampler(server.process.pid)
        with sampler:
            load = run_load(
                url,
                bodies,
                mode="closed",
                seconds=config.seconds,
                processes=args.generators,
                clients=16,
            )
        row = load_row(name, "service: single, 16 clients", load, 1, "closed 16", mb(sampler.peak))
    finally:
        server.stop()
    print(json.dumps(asdict(row)), flush=True)
    return row


# -- the run -----------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    import bentoml
    import open_clip
    import torchvision

    cpu_model = platform.processor() or ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu_model:
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        # What decides the CPU runtimes' speed: vector width, bf16 and AMX support.
        "cpu_flags": " ".join(sorted(flags & SPEED_FLAGS)) or "unknown",
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
        f"- Machine: {m['cpu']} (flags: {m.get('cpu_flags', 'not recorded')}), "
        f"{m['cpu_count']} cores, {m['memory_gb']} GB; {m['platform']}; "
        f"load average {m['load_avg_start']} at start, {m.get('load_avg_end')} at end",
        f"- Versions: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"open_clip {m['open_clip']}, bentoml {m['bentoml']}",
        f"- Weights: {result['weights']}; images: {result['images']}",
    ]
    if result.get("notes"):
        lines.append(f"- Notes: {result['notes']}")
    lines += [
        "",
        "| Model | Measurement | load | pairs/s | p50 ms | p95 ms | p99 ms | failures "
        "| peak RSS MB | peak GPU MB | vs naive | vs ceiling | load generator |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
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
                    "load",
                    "pairs_s",
                    "p50_ms",
                    "p95_ms",
                    "p99_ms",
                    "failures",
                    "peak_rss_mb",
                    "peak_gpu_mb",
                    "vs_naive",
                    "vs_ceiling",
                    "generator",
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
        "--generators",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 4),
        help="load generator processes (default: a quarter of the cores); the report says "
        "when they were the bottleneck",
    )
    parser.add_argument(
        "--batch-scan",
        type=int,
        nargs="*",
        default=[],
        help="also measure the image encoder alone at these batch sizes (to choose "
        "CLIP_MODEL_MAX_BATCH_SIZE)",
    )
    parser.add_argument(
        "--server-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="settings for the started service, e.g. CLIP_MODEL_MAX_BATCH_SIZE=ViT-B-32=256",
    )
    parser.add_argument(
        "--runtimes",
        nargs="*",
        default=["torch-fp32", "openvino-fp32", "openvino-bf16"],
        metavar="RUNTIME-PRECISION",
        help="runtimes compared side by side (bf16 skipped on a CPU without native bf16); none: "
        "no comparison",
    )
    parser.add_argument(
        "--runtimes-only",
        action="store_true",
        help="measure the runtime comparison alone (not the other rows)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        help="items per batch request (default 32 and 256; --quick: 32, since one 256-item "
        "request takes minutes on a loaded CPU)",
    )
    return parser.parse_args(argv)


def benchmark_config(args: argparse.Namespace) -> Config:
    """The counts and durations of a run: --quick's small ones or the full ones, and overrides."""
    config = (
        Config(True, 16, 2, 32, 8, 10.0, 15.0)
        if args.quick
        else Config(False, 256, 10, 1024, 64, 30.0, 60.0)
    )
    config.seconds = args.seconds or config.seconds
    config.batch_seconds = args.seconds or config.batch_seconds
    config.pipeline_pairs = args.pairs or config.pipeline_pairs
    config.batch_sizes = tuple(args.batch_sizes or ((32,) if args.quick else (32, 256)))
    if args.quick:
        config.idle_rate = 1.0
    return config


def model_store(args: argparse.Namespace) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """--bentoml-home, else $BENTOML_HOME, else a temporary store of random-init models (the
    second item, for the caller to clean up)."""
    if args.bentoml_home is not None:
        return args.bentoml_home, None
    if os.environ.get("BENTOML_HOME"):
        return Path(os.environ["BENTOML_HOME"]), None
    temporary = tempfile.TemporaryDirectory(prefix="clip-bench-")
    home = Path(temporary.name)
    print(f"saving random-init {args.models} into {home}", flush=True)
    save_random_init_models(home, args.models)
    return home, temporary


def measure_in_process(
    name: str,
    folder: Path,
    images: list[bytes],
    pairs: list[tuple[bytes, str]],
    config: Config,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[list[Row], dict[str, Any], str]:
    """One model in this process: the encoder ceiling (and --batch-scan), decode alone, the
    pipeline through each decode path and at batch 16, and the naive loop; each row set against
    the naive and the ceiling figures. Also the summary figures and where the weights came from.
    """
    rss_before = tree_rss(psutil.Process())

    def engine_with(**options: Any) -> ClipEngine:
        return ClipEngine(
            ClipSettings(models=[name], default_model=name, **options), {name: folder}
        )

    engine = engine_with(gpu_decode="off")
    engine.warm_up()
    model = engine.models[name]
    base_rss = mb(tree_rss(psutil.Process()) - rss_before)
    weights = model.info.weights
    ceiling = measure_ceiling(model, config)
    scan = [measure_ceiling(model, config, size) for size in args.batch_scan]
    tensor_engine = engine_with(gpu_decode="on")
    batch16 = engine_with(max_batch_size=16, gpu_decode="auto")
    decode_images = images * max(1, config.pipeline_pairs // len(images))
    measured = [
        ceiling,
        *scan,
        measure_decode(engine, name, decode_images, "decode alone: Pillow, thread pool"),
        measure_decode(tensor_engine, name, decode_images, "decode alone: tensor path"),
        measure_pipeline(
            engine,
            name,
            [(data, None) for data, _ in pairs],
            "in-process bytes -> image embedding, Pillow decode",
        ),
        measure_pipeline(engine, name, pairs, "in-process bytes -> score, Pillow decode"),
        measure_pipeline(
            tensor_engine, name, pairs, "in-process bytes -> score, tensor decode path"
        ),
        measure_pipeline(batch16, name, pairs, "in-process bytes -> score, batch 16"),
    ]
    for row in measured:
        print(json.dumps(asdict(row)), flush=True)
    agree = agreement(model, images[:8])
    model_dtype = model.info.dtype
    del tensor_engine, engine, model, batch16
    naive = measure_naive(folder, name, pairs[: config.naive_pairs], device)
    print(json.dumps(asdict(naive)), flush=True)
    measured.append(naive)
    for row in measured:
        row.vs_naive = round(row.pairs_s / naive.pairs_s, 2)
        row.vs_ceiling = round(row.pairs_s / ceiling.pairs_s, 3)
    summary = {
        "in-process model RSS increment MB": base_rss,
        "tensor-vs-PIL max |d uint8|": agree["max_abs_uint8_levels"],
        f"tensor-vs-PIL max |d cosine| in {model_dtype} (bound: fp16 3e-3, fp32 1e-4)": (
            f"{agree['max_abs_cosine']:.2e}"
        ),
    }
    return measured, summary, weights


def start_service(args: argparse.Namespace, home: Path, http_workers: int) -> ServerProcess:
    log = Path(tempfile.mkdtemp(prefix="clip-bench-log-")) / "serve.log"
    env = {
        "CLIP_MODELS": ",".join(args.models),
        "CLIP_HTTP_WORKERS": str(http_workers),  # a front end on every core
        **dict(item.split("=", 1) for item in args.server_env),
    }
    server = ServerProcess(home, log, env)
    print(f"starting bentoml serve (log {log})", flush=True)
    server.start()
    return server


def measure_services(
    args: argparse.Namespace,
    home: Path,
    http_workers: int,
    images: list[bytes],
    config: Config,
    rows: list[Row],
    summary: dict[str, dict[str, Any]],
) -> list[Row]:
    """Every model over HTTP, on --url or a service started here; the new rows, and each
    model's service figures added to ``summary`` (set against its in-process rows)."""
    server = start_service(args, home, http_workers) if args.url is None else None
    base_url = args.url if server is None else server.url
    server_pid = None
    if server is not None:
        assert server.process is not None
        server_pid = server.process.pid
    inputs = service_inputs(images)
    new_rows: list[Row] = []
    try:
        idle_rss = mb(tree_rss(psutil.Process(server_pid))) if server_pid else None
        for name in args.models:
            service_rows, counters = measure_service(
                base_url, name, inputs, config, server_pid, args.generators
            )
            new_rows += service_rows
            summary[name].update(counters)
            pipeline16 = next(r for r in rows if r.model == name and "batch 16" in r.name)
            c16 = counters["single 16 clients pairs/s"]
            summary[name]["service at 16 clients / in-process batch 16 (target >= 1)"] = (
                round(c16 / pipeline16.pairs_s, 2) if pipeline16.pairs_s else None
            )
            peak = max((r.peak_rss_mb or 0.0) for r in service_rows)
            if idle_rss is not None:
                summary[name]["server tree idle RSS MB"] = idle_rss
                summary[name]["server tree peak RSS MB"] = peak
    finally:
        if server is not None:
            server.stop()
    return new_rows


def write_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON to --json, the markdown table appended to --markdown (when given) and printed."""
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = benchmark_config(args)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    home, temporary = model_store(args)
    folders = {name: model_folder(home, store_name(name)) for name in args.models}
    settings = ClipSettings(models=args.models)
    device = resolve_device(settings.device)
    info = machine(device)
    images = [jpeg_bytes(seed) for seed in range(16)]
    pairs = [
        (images[i % len(images)], PROMPTS[i % len(PROMPTS)]) for i in range(config.pipeline_pairs)
    ]
    rows: list[Row] = []
    summary: dict[str, dict[str, Any]] = {}
    weights: set[str] = set()

    if args.runtimes and not args.url:
        for name in args.models:
            runtime_rows, summary[name] = measure_runtimes(
                name, folders[name], home, images, pairs, config, args
            )
            rows += runtime_rows
            weights.add(read_entry(folders[name]).weights)
    for name in args.models if not args.runtimes_only else []:
        model_rows, model_summary, model_weights = measure_in_process(
            name, folders[name], images, pairs, config, args, device
        )
        rows += model_rows
        summary.setdefault(name, {}).update(model_summary)
        weights.add(model_weights)
    if not args.no_service and not args.runtimes_only:
        rows += measure_services(args, home, settings.http_workers, images, config, rows, summary)

    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "started": started,
        "command": "python -m scripts.benchmark "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": info,
        "weights": ", ".join(sorted(weights)),
        "images": "16 photo-like 640x480 JPEGs (quality 90, ~100 KB), 8 repeated prompts",
        "notes": args.notes,
        "config": asdict(config),
        "rows": [asdict(row) for row in rows],
        "summary": summary,
    }
    write_report(result, args)
    if temporary is not None:
        temporary.cleanup()
    return result


if __name__ == "__main__":
    main()
