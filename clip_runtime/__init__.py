"""CLIP-score engine: settings, model loading, image and text processing, scoring.

Knows nothing of BentoML or HTTP; the service, the CLI and the benchmarks all drive it.
"""

from clip_runtime.engine import ClipEngine, Preprocessing, check_text, resolve_model_name
from clip_runtime.errors import ClipError
from clip_runtime.jobs import Job, JobOutcome
from clip_runtime.model import BatchReport, ClipModel, ModelInfo
from clip_runtime.settings import ClipSettings, get_settings

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
