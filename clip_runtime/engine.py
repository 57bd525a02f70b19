"""The engine: served models by name, request validation, and the two halves of the data flow.

``Preprocessing`` (decode bytes -> crop, per request, in a thread pool) needs no weights, so the
HTTP front end can run it; ``ClipEngine`` (crops + texts -> scores, per model batch) holds the
weights. In-process users (CLI, benchmarks) use both through ``ClipEngine.score_pairs``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clip_runtime.device import resolve_device, resolve_dtype
from clip_runtime.errors import (
    ClipError,
    EmptyTextError,
    InvalidTextError,
    TextTooLongError,
    UnknownModelError,
)
from clip_runtime.fetch import FetchPolicy
from clip_runtime.images import ImageLimits, ImagePreprocessor
from clip_runtime.memory import DecodeBudget
from clip_runtime.model import BatchReport, ClipModel, JobOutcome, PairScore
from clip_runtime.model_entry import ModelEntry, read_entry
from clip_runtime.settings import ClipSettings
from clip_runtime.tensor_decode import TensorPreprocessor, tensor_decode_enabled

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


@dataclass(frozen=True)
class ScoreJob:
    """One job for a model batch: a preprocessed crop (HWC uint8) and/or a text. Both: a pair to
    score; one: an embedding to compute. ``keep_vectors`` also returns a pair's embeddings."""

    model: str
    crop: np.ndarray | None
    text: str | None
    keep_vectors: bool = False


class Preprocessing:
    """Per-model image preprocessing and a decode pool sized to the machine (no weights)."""

    def __init__(self, settings: ClipSettings, folders: Mapping[str, Path]) -> None:
        self.settings = settings
        limits = image_limits(settings)
        self.entries: dict[str, ModelEntry] = {
            name: read_entry(folders[name]) for name in settings.models
        }
        self.preprocessors = {
            name: ImagePreprocessor(entry.preprocess_cfg, limits)
            for name, entry in self.entries.items()
        }
        self.pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="clip-decode")

    def crop(self, model: str, data: bytes) -> np.ndarray:
        return self.preprocessors[model].from_bytes(data)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class ClipEngine:
    """Loaded models by served name; scores batches of jobs that may mix models."""

    def __init__(self, settings: ClipSettings, folders: Mapping[str, Path]) -> None:
        self.settings = settings
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.precision, device)
        limits = image_limits(settings)
        self.models: dict[str, ClipModel] = {}
        for name in settings.models:
            logger.info("loading %s from %s on %s", name, folders[name], device)
            self.models[name] = ClipModel(
                name, folders[name], device, dtype, limits, settings.text_cache_size
            )
        # The batched torch decode path (nvjpeg on CUDA), for in-process scoring.
        self.tensor_preprocessors: dict[str, TensorPreprocessor] = {}
        if tensor_decode_enabled(settings.gpu_decode, device):
            for name, model in self.models.items():
                self.tensor_preprocessors[name] = TensorPreprocessor(
                    model.entry.preprocess_cfg, limits, device
                )
        self.ready = False

    def warm_up(self) -> None:
        for model in self.models.values():
            model.warm_up()
        self.ready = True

    def model(self, name: str | None) -> ClipModel:
        return self.models[resolve_model_name(self.settings, name)]

    def run_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[list[JobOutcome], dict[str, BatchReport]]:
        """Outcomes in job order; jobs are grouped by model and run in chunks of max_batch_size."""
        results: list[JobOutcome | None] = [None] * len(jobs)
        reports: dict[str, BatchReport] = {}
        by_model: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_model.setdefault(job.model, []).append(index)
        step = self.settings.max_batch_size
        for name, indices in by_model.items():
            model = self.model(name)
            report = reports.setdefault(name, BatchReport())
            for start in range(0, len(indices), step):
                chunk = [jobs[i] for i in indices[start : start + step]]
                outcomes = model.run(
                    [job.crop for job in chunk],
                    [job.text for job in chunk],
                    [job.keep_vectors for job in chunk],
                    report,
                )
                for i, outcome in zip(indices[start : start + step], outcomes, strict=True):
                    results[i] = outcome
        return [result for result in results if result is not None], reports

    def score_jobs(
        self, jobs: Sequence[ScoreJob]
    ) -> tuple[list[PairScore], dict[str, BatchReport]]:
        """Pair scores in job order (every job must carry a crop and a text)."""
        outcomes, reports = self.run_jobs(jobs)
        scores = []
        for outcome in outcomes:
            if outcome.cosine is None:
                raise ValueError("score_jobs needs pairs; use run_jobs for embeddings")
            scores.append(PairScore(cosine=outcome.cosine, text_truncated=outcome.text_truncated))
        return scores, reports

    def score_pairs(
        self, model: str | None, pairs: Sequence[tuple[bytes, str]], pool: ThreadPoolExecutor
    ) -> list[PairScore | ClipError]:
        """In-process end to end: decode in ``pool``, score the good pairs, keep per-item errors."""
        name = resolve_model_name(self.settings, model)
        if name in self.tensor_preprocessors:
            return self._score_pairs_tensor(name, pairs, pool)
        preprocessor = self.models[name].preprocessor

        def prepare(pair: tuple[bytes, str]) -> ScoreJob | ClipError:
            data, text = pair
            try:
                return ScoreJob(
                    name, preprocessor.from_bytes(data), check_text(self.settings, text)
                )
            except ClipError as error:
                return error

        prepared = list(pool.map(prepare, pairs))
        jobs = [job for job in prepared if isinstance(job, ScoreJob)]
        scores = iter(self.score_jobs(jobs)[0])
        return [next(scores) if isinstance(item, ScoreJob) else item for item in prepared]

    def _score_pairs_tensor(
        self, name: str, pairs: Sequence[tuple[bytes, str]], pool: ThreadPoolExecutor
    ) -> list[PairScore | ClipError]:
        """``score_pairs`` through the tensor decode path, a chunk of max_batch_size at a time.
        Images it does not support (or cannot decode) go through the PIL path, which also turns
        bad input into the same per-item errors."""
        model = self.models[name]
        tensor = self.tensor_preprocessors[name]
        results: list[PairScore | ClipError] = []
        step = self.settings.max_batch_size
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            texts: list[str | ClipError] = []
            for _, text in chunk:
                try:
                    texts.append(check_text(self.settings, text))
                except ClipError as error:
                    texts.append(error)
            wanted = [i for i, text in enumerate(texts) if not isinstance(text, ClipError)]
            fast = [i for i in wanted if tensor.supports(chunk[i][0])]
            decoded = dict(
                zip(fast, tensor.decode_each([chunk[i][0] for i in fast], pool), strict=True)
            )
            slow = [i for i in wanted if decoded.get(i) is None]
            slow_crops = dict(
                zip(
                    slow,
                    pool.map(
                        _pil_crop, [model.preprocessor] * len(slow), [chunk[i][0] for i in slow]
                    ),
                    strict=True,
                )
            )
            outcome: dict[int, PairScore | ClipError] = {
                i: error for i, error in slow_crops.items() if isinstance(error, ClipError)
            }
            good = [i for i in wanted if i not in outcome]
            if good:
                # One uint8 batch on the device in chunk order, whichever path made each crop.
                crops = torch.empty(
                    (len(good), 3, *tensor.size), dtype=torch.uint8, device=tensor.device
                )
                fast_rows = [row for row, i in enumerate(good) if decoded.get(i) is not None]
                if fast_rows:
                    crops[fast_rows] = tensor.crop([decoded[good[row]] for row in fast_rows])
                for row, i in enumerate(good):
                    if i in slow_crops:  # torch.tensor copies: the PIL crop is read-only
                        crops[row] = torch.tensor(slow_crops[i]).permute(2, 0, 1)
                scores = model.score_pixels(tensor.normalize(crops), [str(texts[i]) for i in good])
                outcome.update(zip(good, scores, strict=True))
            for i, text in enumerate(texts):
                results.append(text if isinstance(text, ClipError) else outcome[i])
        return results


def _pil_crop(preprocessor: ImagePreprocessor, data: bytes) -> np.ndarray | ClipError:
    try:
        return preprocessor.from_bytes(data)
    except ClipError as error:
        return error
