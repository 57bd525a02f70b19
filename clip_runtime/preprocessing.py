"""What the HTTP front end needs of the engine without the weights: request validation, the URL
policy, and ``Preprocessing`` (encoded image -> model-sized crop, in a thread pool).

Nothing here imports torch or open_clip at import time: the front end's worker accepts
connections only after its imports and start-up, and probes must be answered within a second
or two. The open_clip transforms (torch, torchvision) are built in the decode pool once the
worker is up; ``Preprocessing.ready`` says when.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from clip_runtime.errors import (
    EmptyTextError,
    InvalidTextError,
    ModelNotReadyError,
    TextTooLongError,
    UnknownModelError,
)
from clip_runtime.fetch import FetchPolicy
from clip_runtime.images import ImageLimits, ImagePreprocessor
from clip_runtime.memory import DecodeBudget, Reservation
from clip_runtime.model_entry import ModelEntry, read_entry
from clip_runtime.settings import ClipSettings

logger = logging.getLogger(__name__)


def image_limits(settings: ClipSettings) -> ImageLimits:
    return ImageLimits(
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        min_image_side=settings.min_image_side,
        budget=DecodeBudget(settings.decode_memory_budget_bytes, settings.decode_budget_wait_s),
    )


def fetch_policy(settings: ClipSettings) -> FetchPolicy:
    return FetchPolicy(
        enabled=settings.allow_urls,
        allowed_hosts=tuple(settings.url_allowed_hosts),
        max_bytes=settings.max_image_bytes,
        connect_timeout_s=settings.url_connect_timeout_s,
        read_timeout_s=settings.url_read_timeout_s,
        total_timeout_s=settings.url_total_timeout_s,
        max_redirects=settings.url_max_redirects,
    )


def resolve_model_name(settings: ClipSettings, requested: str | None) -> str:
    """The served model a request asked for (or the default); unknown names list the served."""
    name = requested or settings.default_model
    if name not in settings.models:
        shown = name if len(name) <= 64 else name[:64] + "..."  # never echo unbounded input
        raise UnknownModelError(f"model {shown!r} is not served; served models: {settings.models}")
    return name


def check_text(settings: ClipSettings, text: str) -> str:
    if not text or not text.strip():
        raise EmptyTextError("text is empty")
    if len(text) > settings.max_text_chars:
        raise TextTooLongError(
            f"text has {len(text)} characters; at most {settings.max_text_chars} are accepted"
        )
    if "\x00" in text:
        raise InvalidTextError("text contains a NUL character")
    return text


class Preprocessing:
    """Per-model image preprocessing and a decode pool sized to the machine (no weights).

    Model entries are read at once (a missing or malformed one fails here, at start); the
    open_clip transforms are built in the decode pool, so that construction returns in
    milliseconds and the caller can answer probes while torch is imported.
    """

    def __init__(self, settings: ClipSettings, folders: Mapping[str, Path]) -> None:
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {
            name: read_entry(folders[name]) for name in settings.models
        }
        self.limits = image_limits(settings)
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="clip-decode")
        self._preprocessors: Future[dict[str, ImagePreprocessor]] = self.pool.submit(
            self._build, self.limits
        )
        self._preprocessors.add_done_callback(_log_build_failure)

    def _build(self, limits: ImageLimits) -> dict[str, ImagePreprocessor]:
        return {
            name: ImagePreprocessor(entry.preprocess_cfg, limits)
            for name, entry in self.entries.items()
        }

    @property
    def ready(self) -> bool:
        """True once every model's transform is built (never, if building failed)."""
        done = self._preprocessors.done()
        return done and self._preprocessors.exception() is None

    @property
    def preprocessors(self) -> dict[str, ImagePreprocessor]:
        """The transforms by model; waits for them (and re-raises a failure to build them)."""
        return self._preprocessors.result()

    def check_ready(self) -> None:
        """Refuse work with 503 ``service_unavailable`` until the transforms are built."""
        if not self.ready:
            raise ModelNotReadyError("image preprocessing is still starting; retry later")

    def claim(self) -> Reservation:
        """An empty claim on this process's decode budget, for an image still arriving."""
        budget = self.limits.budget
        if budget is None:
            raise RuntimeError("image_limits always sets a decode budget")
        return budget.reservation()

    def crop(self, model: str, data: bytes, claim: Reservation | None = None) -> np.ndarray:
        return self.preprocessors[model].from_bytes(data, claim)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _log_build_failure(future: Future[dict[str, ImagePreprocessor]]) -> None:
    error = future.exception()
    if error is not None:
        logger.error("image preprocessing could not be built: %s", error, exc_info=error)
