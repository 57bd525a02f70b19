"""CLIP-score engine: settings, model loading, image and text processing, scoring.

Knows nothing of BentoML or HTTP; the service, the CLI and the benchmarks all drive it.

The names below are imported on first use (PEP 562): ``clip_runtime.errors``,
``clip_runtime.settings`` and ``clip_runtime.image_field`` stay importable without torch, which
``clip-eval --engine remote`` relies on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clip_runtime.engine import ClipEngine, Preprocessing, check_text, resolve_model_name
    from clip_runtime.errors import ClipError
    from clip_runtime.jobs import Job, JobOutcome
    from clip_runtime.model import BatchReport, ClipModel, ModelInfo
    from clip_runtime.settings import ClipSettings, get_settings

_HOMES = {
    "ClipEngine": "engine",
    "Preprocessing": "engine",
    "check_text": "engine",
    "resolve_model_name": "engine",
    "ClipError": "errors",
    "Job": "jobs",
    "JobOutcome": "jobs",
    "BatchReport": "model",
    "ClipModel": "model",
    "ModelInfo": "model",
    "ClipSettings": "settings",
    "get_settings": "settings",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'clip_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clip_runtime.{home}"), name)
