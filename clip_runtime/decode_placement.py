"""Where an image is decoded and cropped: in the HTTP front end (Pillow) or on the model worker's
device (``clip_runtime.tensor_decode``, ``CLIP_GPU_DECODE``).

Torch-free, so that the front end decides without loading torch. The model worker resolves its
device with torch (``clip_runtime.engine.device_decoded_models``); the front end predicts it
from the settings and the NVIDIA driver (``forwarded_models``). Either answer is correct for any
image: the engine crops the encoded images it is sent with Pillow when it has no device path,
and takes ready crops as they are; a wrong prediction only moves the decode to the other
process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from clip_runtime.model_entry import ModelEntry
from clip_runtime.settings import ClipSettings

TensorDecodeMode = Literal["auto", "on", "off"]

_EXIF_ORIENTATION = 0x0112
# One folder per GPU the NVIDIA kernel driver drives.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def device_decode_enabled(mode: TensorDecodeMode, device_type: str) -> bool:
    """``auto``: only on CUDA, where it moves decode off the CPU; on CPU the PIL path with its
    thread pool is as fast and is the reference."""
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def handles_preprocessing(preprocess_cfg: dict[str, Any]) -> bool:
    """The device path reproduces open_clip's "shortest" resize only; its other modes pad or
    squash (SigLIP's webli tags squash), and those models keep the PIL path."""
    return preprocess_cfg.get("resize_mode", "shortest") == "shortest"


def decodes_like_pillow(header: Image.Image) -> bool:
    """True when a JPEG decode of this image (its header read, no pixels) gives the pixels the
    PIL path would: a JPEG in RGB or greyscale, not rotated by EXIF."""
    if header.format not in {"JPEG", "MPO"} or header.mode not in {"RGB", "L"}:
        return False  # CMYK/YCCK: Pillow converts differently
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = header.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block: the PIL path decides
        return False
    return bool(orientation == 1)


def cuda_expected(device: str, gpus: Path = NVIDIA_GPUS) -> bool:
    """Whether the model worker will run on CUDA, without torch: ``cuda*`` says so; ``auto``
    when the NVIDIA driver drives a GPU and ``CUDA_VISIBLE_DEVICES`` does not hide them all."""
    if device != "auto":
        return device.startswith("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return False
    return gpus.is_dir() and any(gpus.iterdir())


def forwarded_models(settings: ClipSettings, entries: Mapping[str, ModelEntry]) -> set[str]:
    """The served models whose JPEGs the front end sends to the model worker encoded: those the
    worker is expected to decode on its device."""
    device_type = "cuda" if cuda_expected(settings.device) else "cpu"
    if not device_decode_enabled(settings.gpu_decode, device_type):
        return set()
    return {name for name, entry in entries.items() if handles_preprocessing(entry.preprocess_cfg)}
