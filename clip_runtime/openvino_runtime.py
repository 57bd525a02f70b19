"""The OpenVINO runtime: both towers converted from the entry's own weights, compiled for the CPU
with the plan's precision hint.

Conversion (``openvino.convert_model`` tracing open_clip's modules) takes tens of seconds, so the
converted model (OpenVINO IR, float32 weights) is kept on disk under
``CACHE_DIR/<weights sha256>/openvino-<version>/`` with a manifest of its files' sha256. A cache
whose manifest does not match its files, or that cannot be read, is deleted and converted again:
never trusted. The IR does not depend on the precision (the hint applies when compiling), so one
conversion serves fp32 and bf16.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from clip_runtime.model_entry import WEIGHTS_FILE, Family, ModelEntry, sha256_of

if TYPE_CHECKING:
    import openvino as ov

    from clip_runtime.runtimes import Runtime, RuntimePlan

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
TOWERS = ("image", "text")
# The batch the towers are traced with; the converted inputs keep a dynamic batch dimension.
TRACE_BATCH = 2


@dataclass
class ConversionStats:
    """Conversions done in this process (tests assert a cached start converts nothing)."""

    conversions: int = 0
    last_convert_s: float = 0.0


stats = ConversionStats()


def openvino_version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]


def cache_folder(cache_dir: Path, entry: ModelEntry) -> Path:
    """Where ``entry``'s converted towers are kept for this OpenVINO version."""
    return cache_dir / entry.weights_sha256 / f"openvino-{openvino_version()}"


class OpenVinoEncoders:
    """Both towers compiled for the CPU. One infer request per tower, used under a lock: the
    engine encodes one batch at a time, and the request's threads use every core already."""

    runtime: Runtime = "openvino"

    def __init__(
        self,
        folder: Path,
        entry: ModelEntry,
        plan: RuntimePlan,
        image_size: tuple[int, int],
        context_length: int,
    ) -> None:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        towers = load_or_convert(folder, entry, plan.cache_dir, image_size, context_length)
        config = {
            hints.inference_precision: ov.Type.bf16 if plan.precision == "bf16" else ov.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            props.inference_num_threads: plan.threads,
        }
        core = ov.Core()
        self._image = core.compile_model(towers["image"], "CPU", config).create_infer_request()
        self._text = core.compile_model(towers["text"], "CPU", config).create_infer_request()
        self._lock = threading.Lock()
        self.logit_scale, self.logit_bias, self.family = _logit_parameters(folder)

    def _infer(self, request: ov.InferRequest, values: torch.Tensor) -> torch.Tensor:
        with self._lock:
            request.infer([values.numpy()])
            # The request reuses its output buffer on the next call: copy out.
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._infer(self._image, pixels.detach().cpu().float().contiguous())

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._infer(self._text, tokens.detach().cpu().long().contiguous())


def _logit_parameters(folder: Path) -> tuple[float, float | None, Family]:
    """logit_scale (exp'd), SigLIP's logit_bias and the family, read from the weights file (the
    torch model is not built when the converted towers come from the cache)."""
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
        scale = float(weights.get_tensor("logit_scale").float().exp().item())
        if "logit_bias" in weights.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            return scale, float(weights.get_tensor("logit_bias").float().item()), "siglip"
    return scale, None, "clip"


def load_or_convert(
    folder: Path,
    entry: ModelEntry,
    cache_dir: Path,
    image_size: tuple[int, int],
    context_length: int,
) -> dict[str, Any]:
    """The towers as OpenVINO models: read from a verified cache, else converted (and cached
    when the cache folder is writable; otherwise kept in memory, with a warning)."""
    import openvino as ov

    target = cache_folder(cache_dir, entry)
    problem = verify_cache(target, entry)
    if problem is None:
        core = ov.Core()
        return {tower: core.read_model(target / f"{tower}.xml") for tower in TOWERS}
    if target.exists():
        logger.warning("OpenVINO cache %s rejected (%s): converting again", target, problem)
        shutil.rmtree(target, ignore_errors=True)
    towers = convert_towers(folder, image_size, context_length)
    try:
        write_cache(target, entry, towers)
    except OSError as error:
        logger.warning(
            "OpenVINO cache %s not written (%s): next start converts again", target, error
        )
    return towers


def convert_towers(
    folder: Path, image_size: tuple[int, int], context_length: int
) -> dict[str, ov.Model]:
    """Both towers of the entry's open_clip model, traced with a dynamic batch dimension."""
    import open_clip
    import openvino as ov

    started = time.perf_counter()
    logger.info("converting %s to OpenVINO (once per weights and OpenVINO version)", folder)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device="cpu")
    # Without requires_grad_(False) torch takes a different attention path on each trace and
    # the tracer's check fails.
    model = model.eval().requires_grad_(False)
    pixels = torch.zeros((TRACE_BATCH, 3, *image_size), dtype=torch.float32)
    tokens = torch.zeros((TRACE_BATCH, context_length), dtype=torch.int64)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every shape check in open_clip's attention; the dynamic batch
        # is declared below, and the fidelity tests check the result.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        image = ov.convert_model(
            _Tower(model, "encode_image"),
            example_input=pixels,
            input=[(ov.PartialShape([-1, 3, *image_size]), ov.Type.f32)],
        )
        text = ov.convert_model(
            _Tower(model, "encode_text"),
            example_input=tokens,
            input=[(ov.PartialShape([-1, context_length]), ov.Type.i64)],
        )
    stats.conversions += 1
    stats.last_convert_s = time.perf_counter() - started
    logger.info("converted %s in %.1f s", folder, stats.last_convert_s)
    return {"image": image, "text": text}


class _Tower(torch.nn.Module):
    """One tower as a module of its own (the tracer traces ``forward``)."""

    def __init__(self, model: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.model = model  # registers the weights as this module's
        self.method = method

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(values)


def write_cache(target: Path, entry: ModelEntry, towers: dict[str, ov.Model]) -> None:
    """Save the IR beside, then move it in whole, so a reader never sees half a cache."""
    import openvino as ov

    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for tower, model in towers.items():
            # float32 weights as converted: fp16 compression would break the fp32 fidelity bound.
            ov.save_model(model, staging / f"{tower}.xml", compress_to_fp16=False)
        files = sorted(path.name for path in staging.iterdir())
        manifest = {
            "version": MANIFEST_VERSION,
            "weights_sha256": entry.weights_sha256,
            "openvino": openvino_version(),
            "files": {name: sha256_of(staging / name) for name in files},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if target.exists():  # another process cached it meanwhile
            shutil.rmtree(staging)
            return
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify_cache(target: Path, entry: ModelEntry) -> str | None:
    """None when ``target`` holds this entry's towers for this OpenVINO version, every file
    matching the manifest; else why not."""
    manifest_path = target / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
        expected = (MANIFEST_VERSION, entry.weights_sha256, openvino_version())
        if (manifest["version"], manifest["weights_sha256"], manifest["openvino"]) != expected:
            return "manifest is for other weights or another OpenVINO"
    except (ValueError, KeyError, TypeError) as error:
        return f"manifest unreadable: {error}"
    needed = {f"{tower}.{suffix}" for tower in TOWERS for suffix in ("xml", "bin")}
    if not needed <= files.keys():
        return "manifest lists no towers"
    for name, digest in files.items():
        path = target / name
        if not path.is_file():
            return f"{name} missing"
        if sha256_of(path) != digest:
            return f"{name} does not match its sha256"
    return None
