"""The seam between the engine and what runs the two towers.

``ClipModel`` tokenizes, preprocesses and scores; an ``Encoders`` turns a normalized pixel batch
or a token batch into raw (unnormalized) float32 embeddings. ``torch`` runs open_clip's own
modules; ``openvino`` (``clip_runtime.openvino_runtime``) runs them converted. Another runtime
(TensorRT, ONNX Runtime) is one more ``Encoders`` and one more branch in ``load_encoders``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol

import torch

from clip_runtime.device import dtype_name, resolve_device, resolve_dtype
from clip_runtime.errors import RuntimeSetupError
from clip_runtime.model_entry import Family, ModelEntry, family_of
from clip_runtime.settings import ClipSettings

Runtime = Literal["torch", "openvino"]
# /proc/cpuinfo flags of CPUs that compute in bf16 natively (no emulation through fp32).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CACHE_FOLDER = "clip-score-cache"


class Encoders(Protocol):
    """Both towers of one model on one runtime."""

    runtime: Runtime
    logit_scale: float  # exp() of the learnt temperature
    logit_bias: float | None  # SigLIP's learnt bias; None for CLIP
    family: Family

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Raw float32 embeddings of a normalized float32 NCHW batch."""
        ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw float32 embeddings of a batch of token ids."""
        ...


@dataclass(frozen=True)
class RuntimePlan:
    """How every model of an engine runs, resolved once from the settings."""

    runtime: Runtime
    device: torch.device
    dtype: torch.dtype  # what the weights compute in (OpenVINO: its inference precision hint)
    cache_dir: Path
    threads: int

    @property
    def precision(self) -> str:
        return dtype_name(self.dtype)


def torch_plan(device: torch.device, dtype: torch.dtype = torch.float32) -> RuntimePlan:
    """open_clip's own modules on ``device`` in ``dtype`` (for tools and tests)."""
    return RuntimePlan(
        runtime="torch",
        device=device,
        dtype=dtype,
        cache_dir=default_cache_dir(),
        threads=torch.get_num_threads(),
    )


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX or AVX512_BF16 (read from /proc/cpuinfo; elsewhere, OpenVINO's own
    view of the CPU when it is installed)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return bool(NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    if openvino_installed():
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return False


def default_cache_dir() -> Path:
    home = os.environ.get("BENTOML_HOME")
    if home:
        return Path(home) / CACHE_FOLDER
    return Path.home() / ".cache" / "clip-score"


def resolve_runtime(settings: ClipSettings) -> RuntimePlan:
    """The runtime, device and precision the settings ask for, or ``RuntimeSetupError`` when this
    machine cannot run them as asked."""
    device = resolve_device(settings.device)
    runtime: Runtime
    if settings.runtime == "auto":
        runtime = "openvino" if device.type == "cpu" and openvino_installed() else "torch"
    else:
        runtime = settings.runtime
    if runtime == "openvino":
        if not openvino_installed():
            raise RuntimeSetupError(
                "CLIP_RUNTIME=openvino but the openvino package is not installed: "
                "`pip install openvino`, or set CLIP_RUNTIME=torch (or auto)"
            )
        if device.type != "cpu":
            raise RuntimeSetupError(
                f"CLIP_RUNTIME=openvino runs on the CPU, not {device}: set CLIP_DEVICE=cpu, "
                "or CLIP_RUNTIME=torch (or auto) for the accelerator"
            )
    dtype = _resolve_precision(settings, runtime, device)
    return RuntimePlan(
        runtime=runtime,
        device=device,
        dtype=dtype,
        cache_dir=settings.runtime_cache_dir or default_cache_dir(),
        # The model worker's thread count is torch's (OMP_NUM_THREADS, else the cores); OpenVINO
        # follows it so both runtimes use the machine alike.
        threads=torch.get_num_threads(),
    )


def _resolve_precision(
    settings: ClipSettings, runtime: Runtime, device: torch.device
) -> torch.dtype:
    precision = settings.precision
    if device.type == "cpu":
        native_bf16 = cpu_has_native_bf16()
        if precision == "bf16" and not native_bf16:
            raise RuntimeSetupError(
                "CLIP_PRECISION=bf16 but this CPU has no native bf16 (neither AMX nor "
                "AVX512_BF16), where it would run slower than fp32: set CLIP_PRECISION=fp32 "
                "(or auto)"
            )
        if runtime == "openvino":
            if precision == "fp16":
                raise RuntimeSetupError(
                    "CLIP_PRECISION=fp16 is not offered by the OpenVINO CPU runtime: set "
                    "CLIP_PRECISION=bf16, fp32 or auto"
                )
            if precision == "auto":
                return torch.bfloat16 if native_bf16 else torch.float32
    return resolve_dtype(precision, device)


class TorchEncoders:
    """open_clip's own modules, cast to the plan's dtype, on its device."""

    runtime: Runtime = "torch"

    def __init__(self, folder: Path, plan: RuntimePlan) -> None:
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}", device="cpu")
        # Cast once, then move: weights never change after this point.
        self._model = model.to(device=plan.device, dtype=plan.dtype).eval().requires_grad_(False)
        self._device, self._dtype = plan.device, plan.dtype
        self.family: Family = family_of(self._model)
        self.logit_scale = float(self._model.logit_scale.exp().item())
        bias = getattr(self._model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.item())

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self._device, non_blocking=True).to(self._dtype)
        return self._model.encode_image(pixels).float()

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._model.encode_text(tokens.to(self._device, non_blocking=True)).float()


def load_encoders(
    folder: Path,
    entry: ModelEntry,
    plan: RuntimePlan,
    image_size: tuple[int, int],
    context_length: int,
) -> Encoders:
    """``folder``'s towers on the plan's runtime (weights already verified by the caller)."""
    if plan.runtime == "openvino":
        from clip_runtime.openvino_runtime import OpenVinoEncoders

        return OpenVinoEncoders(folder, entry, plan, image_size, context_length)
    return TorchEncoders(folder, plan)
