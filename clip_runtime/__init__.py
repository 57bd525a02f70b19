"""CLIP-score engine: settings, model loading, image and text processing, scoring.

Knows nothing of BentoML or HTTP; the service, the CLI and the benchmarks all drive it. The
names that need torch (``ClipEngine``, ``ClipModel``, ...) are imported on first use, so that the
HTTP front end, which imports this package, starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clip_runtime.errors import ClipError
from clip_runtime.jobs import Job, JobOutcome
from clip_runtime.preprocessing import Preprocessing, check_text, resolve_model_name
from clip_runtime.settings import ClipSettings, get_settings

if TYPE_CHECKING:
    from clip_runtime.engine import ClipEngine
    from clip_runtime.model import BatchReport, ClipModel, ModelInfo

_LAZY = {
    "ClipEngine": "clip_runtime.engine",
    "BatchReport": "clip_runtime.model",
    "ClipModel": "clip_runtime.model",
    "ModelInfo": "clip_runtime.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clip_runtime' has no attribute {name!r}")


__all__ = [
    "BatchReport",
    "ClipEngine",
    "ClipError",
    "ClipModel",
    "ClipSettings",
    "Job",
    "JobOutcome",
    "ModelInfo",
    "Preprocessing",
    "check_text",
    "get_settings",
    "resolve_model_name",
]
