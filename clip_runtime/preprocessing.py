"""What the HTTP front end needs of the engine without the weights: request validation, the URL
policy, and ``Preprocessing`` (encoded image -> model-sized uint8 crop, in a thread pool).

Nothing here imports torch or open_clip, at import or later: the crop is Pillow's
(``clip_runtime.image_inputs.ImagePreprocessor``), and the model worker tokenizes captions and
normalizes crops (docs/architecture-data-path.md). An HTTP worker so stays small, and
accepts connections (and answers probes) as soon as it is up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from clip_runtime.decode_placement import decodes_like_pillow, forwarded_models
from clip_runtime.errors import (
    EmptyTextError,
    InvalidTextError,
    ModelNotReadyError,
    TextTooLongError,
    UnknownModelError,
)
from clip_runtime.fetch import FetchPolicy
from clip_runtime.image_inputs import ImageLimits, ImagePreprocessor, open_header
from clip_runtime.jobs import ImageInput
from clip_runtime.memory import DecodeBudget, Reservation, freeze_startup_objects
from clip_runtime.model_entry import ModelEntry, read_entry
from clip_runtime.settings import ClipSettings

logger = logging.getLogger(__name__)


def image_limits(settings: ClipSettings) -> ImageLimits:
    return ImageLimits(
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        min_image_side=settings.min_image_side,
        max_aspect_ratio=settings.max_image_aspect_ratio,
        max_jpeg_scans=settings.max_jpeg_scans,
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


@dataclass(frozen=True)
class _Transforms:
    """What the front end builds in the background."""

    preprocessors: dict[str, ImagePreprocessor]
    forwarded: set[str]  # models whose JPEGs go to the model worker encoded


class Preprocessing:
    """The front end's half: per-model image checks and crops, and a decode pool sized to the
    machine (no weights, no torch).

    Model entries are read at once (a missing or malformed one fails here, at start); the
    crops are built in the decode pool (``ready`` says when), so construction returns at once.
    """

    def __init__(self, settings: ClipSettings, folders: Mapping[str, Path]) -> None:
        self.settings = settings
        self.entries: dict[str, ModelEntry] = {
            name: read_entry(folders[name]) for name in settings.models
        }
        self.limits = image_limits(settings)
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="clip-decode")
        self._transforms: Future[_Transforms] = self.pool.submit(self._build)
        self._transforms.add_done_callback(_log_build_failure)

    def _build(self) -> _Transforms:
        transforms = _Transforms(
            preprocessors={
                name: ImagePreprocessor(entry.preprocess_cfg, self.limits)
                for name, entry in self.entries.items()
            },
            forwarded=forwarded_models(self.settings, self.entries),
        )
        freeze_startup_objects()  # start-up objects are in: keep the collections cheap
        return transforms

    @property
    def ready(self) -> bool:
        """True once every model's transforms are built (never, if building failed)."""
        return self._transforms.done() and self._transforms.exception() is None

    def check_ready(self) -> None:
        """Refuse work with 503 ``model_not_ready`` until the transforms are built."""
        if not self.ready:
            raise ModelNotReadyError("image preprocessing is still starting; retry later")

    @property
    def preprocessors(self) -> dict[str, ImagePreprocessor]:
        """The crops by model; waits for them (and re-raises a failure to build them)."""
        return self._transforms.result().preprocessors

    def claim(self) -> Reservation:
        """An empty claim on this process's decode budget, for an image still arriving."""
        budget = self.limits.budget
        if budget is None:
            raise RuntimeError("image_limits always sets a decode budget")
        return budget.reservation()

    def image(self, model: str, data: bytes, claim: Reservation | None = None) -> ImageInput:
        """What the model worker gets for an image: the encoded JPEG when it decodes JPEGs on its
        device and this one decodes there as Pillow would (every header limit checked here),
        else the crop, made here (counted in ``claim`` when the caller holds one)."""
        transforms = self._transforms.result()
        preprocessor = transforms.preprocessors[model]
        header = open_header(data, preprocessor.limits)
        if model in transforms.forwarded and decodes_like_pillow(header):
            return data
        return preprocessor.from_header(header, data, claim)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _log_build_failure(future: Future[_Transforms]) -> None:
    error = future.exception()
    if error is not None:
        logger.error("image preprocessing could not be built: %s", error, exc_info=error)
