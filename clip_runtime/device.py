"""Which device and floating-point precision the models run with."""

from __future__ import annotations

import torch

from clip_runtime.settings import Precision

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is taken as a torch device string."""
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"CLIP_DEVICE={requested} but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"CLIP_DEVICE={requested} but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """``auto`` is fp16 on CUDA (tensor cores) and fp32 elsewhere (CPU half precision is slow)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)
