"""The engine: served models by name, the weights side of the data flow.

``ClipEngine`` (jobs -> outcomes, per model batch) holds the weights and is what the model
worker and in-process users (CLI, benchmark) call, with encoded images or ready crops in their
jobs. The weight-free half (validation, ``Preprocessing``) is ``clip_runtime.preprocessing``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clip_runtime.decode_placement import handles_preprocessing
from clip_runtime.device import resolve_device
from clip_runtime.errors import ClipError
from clip_runtime.image_inputs import ImagePreprocessor
from clip_runtime.jobs import ImageInput, Job, JobOutcome
from clip_runtime.memory import freeze_startup_objects
from clip_runtime.model import BatchReport, ClipModel, Crop
from clip_runtime.model_entry import ModelEntry
from clip_runtime.preprocessing import check_text, image_limits, resolve_model_name
from clip_runtime.runtimes import resolve_runtime
from clip_runtime.settings import ClipSettings
from clip_runtime.tensor_decode import SideStream, TensorPreprocessor, tensor_decode_enabled
from clip_runtime.tokens import Tokenized

logger = logging.getLogger(__name__)


def device_decoded_models(settings: ClipSettings, entries: Mapping[str, ModelEntry]) -> set[str]:
    """The served models whose JPEGs the engine decodes on its device (``CLIP_GPU_DECODE``);
    the front end predicts the same without torch (``decode_placement.forwarded_models``)."""
    if not tensor_decode_enabled(settings.gpu_decode, resolve_device(settings.device)):
        return set()
    return {name for name, entry in entries.items() if handles_preprocessing(entry.preprocess_cfg)}


class ClipEngine:
    """Loaded models by served name. ``run`` is the one way in: jobs that may mix models, images
    as crops or as encoded bytes, answered in order with per-job errors."""

    def __init__(self, settings: ClipSettings, folders: Mapping[str, Path]) -> None:
        self.settings = settings
        plan = resolve_runtime(settings)
        device = plan.device
        limits = image_limits(settings)
        self.models: dict[str, ClipModel] = {}
        for name in settings.models:
            logger.info(
                "loading %s from %s on %s (%s, %s)",
                name,
                folders[name],
                device,
                plan.runtime,
                plan.precision,
            )
            self.models[name] = ClipModel(
                name,
                folders[name],
                plan,
                limits,
                settings.text_cache_size,
                settings.max_text_word_chars,
            )
        # Encoded JPEGs decoded in batches on the device (nvjpeg on CUDA); the rest with PIL.
        self.tensor_preprocessors: dict[str, TensorPreprocessor] = {}
        self.side_streams: dict[str, SideStream] = {}
        entries = {name: model.entry for name, model in self.models.items()}
        for name in device_decoded_models(settings, entries):
            self.tensor_preprocessors[name] = TensorPreprocessor(
                entries[name].preprocess_cfg, limits, device
            )
            self.side_streams[name] = SideStream(device)
        # One thread preparing the next chunk while the model encodes the current one.
        self.prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="clip-engine-prepare")
        # Threads for the PIL decodes of encoded images (Pillow releases the GIL while decoding).
        self.decode_pool = ThreadPoolExecutor(
            settings.decode_workers, thread_name_prefix="clip-engine-decode"
        )
        self.ready = False
        # torch, open_clip and the weights are in: keep the decode budget's collections cheap.
        freeze_startup_objects()

    def warm_up(self) -> None:
        for model in self.models.values():
            model.warm_up()
        self.ready = True

    def model(self, name: str | None) -> ClipModel:
        return self.models[resolve_model_name(self.settings, name)]

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    def run_jobs(self, jobs: Sequence[Job]) -> tuple[list[JobOutcome], dict[str, BatchReport]]:
        """Outcomes in job order, and what each model's batches did. Jobs are grouped by model
        and run in chunks of the model's batch size; a job whose text or image is bad gets an
        outcome carrying its error, and the others in its chunk are scored as usual. Where JPEGs
        are decoded on the device, chunks are at most ``decode_chunk_size`` and the next one is
        decoded (on a stream of its own) while the model encodes the current one."""
        results: list[JobOutcome | None] = [None] * len(jobs)
        reports: dict[str, BatchReport] = {}
        by_model: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            by_model.setdefault(job.model, []).append(index)
        for name, indices in by_model.items():
            model = self.model(name)
            report = reports.setdefault(name, BatchReport())
            for chunk in self._prepared_chunks(name, jobs, indices):
                for i, error in chunk.errors.items():
                    results[i] = JobOutcome(error=error)
                good = list(chunk.crops)
                outcomes = model.score_batch(
                    list(chunk.crops.values()),
                    [chunk.texts[i] for i in good],
                    [jobs[i].keep_vectors for i in good],
                    report,
                    chunk.tokenized,
                )
                for i, outcome in zip(good, outcomes, strict=True):
                    results[i] = outcome
        return [result for result in results if result is not None], reports

    def _prepared_chunks(
        self, name: str, jobs: Sequence[Job], indices: list[int]
    ) -> Iterator[_PreparedChunk]:
        """The model's chunks with texts checked and images cropped; with device decoding, the
        next chunk is prepared in a thread (on its own CUDA stream) while the caller encodes."""
        step = self.settings.batch_size_for(name)
        side = self.side_streams.get(name)
        if side is None:
            for start in range(0, len(indices), step):
                yield self._prepare(name, jobs, indices[start : start + step])
            return
        step = min(step, self.settings.decode_chunk_size)
        chunks = [indices[start : start + step] for start in range(0, len(indices), step)]

        def prepare(chunk: list[int]) -> _PreparedChunk:
            with side.producing():
                prepared = self._prepare(name, jobs, chunk)
                prepared.ready = side.handoff()
            return prepared

        pending = self.prepare_pool.submit(prepare, chunks[0])
        for following in [*chunks[1:], None]:
            prepared = pending.result()
            if following is not None:
                pending = self.prepare_pool.submit(prepare, following)
            device_crops = [c for c in prepared.crops.values() if isinstance(c, torch.Tensor)]
            side.receive(prepared.ready, device_crops)
            yield prepared

    def _prepare(self, name: str, jobs: Sequence[Job], chunk: list[int]) -> _PreparedChunk:
        prepared = _PreparedChunk()
        model = self.models[name]
        for i in chunk:
            try:
                text = prepared.texts[i] = _checked_text(self.settings, jobs[i].text)
                if text is not None and not model.is_cached(text):
                    # Here, per job: a caption the tokenizer refuses fails its job alone.
                    prepared.tokenized[text] = model.tokenizer.tokenize(text)
            except ClipError as error:
                prepared.texts.pop(i, None)
                prepared.errors[i] = error
        crops = self._crops(name, {i: jobs[i].image for i in prepared.texts})
        for i in prepared.texts:  # job order
            crop = crops[i]
            if isinstance(crop, ClipError):
                prepared.errors[i] = crop
            else:
                prepared.crops[i] = crop
        return prepared

    def _crops(
        self, name: str, images: Mapping[int, ImageInput | None]
    ) -> dict[int, Crop | ClipError | None]:
        """Model-sized crops by job index: crops pass as they are, encoded images are decoded
        (in batches on the device where the tensor path takes them, else with PIL)."""
        crops: dict[int, Crop | ClipError | None] = {}
        encoded: dict[int, bytes] = {}
        for i, image in images.items():
            if isinstance(image, bytes):
                encoded[i] = image
            else:
                crops[i] = image
        tensor = self.tensor_preprocessors.get(name)
        if tensor is not None:
            fast = [i for i, data in encoded.items() if tensor.supports(data)]
            decoded = tensor.decode_each([encoded[i] for i in fast], self.decode_pool)
            ok = [(i, image) for i, image in zip(fast, decoded, strict=True) if image is not None]
            if ok:
                resized = tensor.crop_each([image for _, image in ok])
                crops.update(
                    (i, row) for (i, _), row in zip(ok, resized, strict=True) if row is not None
                )
        slow = [i for i in encoded if i not in crops]
        preprocessor = self.models[name].preprocessor
        decoded_by_pil = self.decode_pool.map(
            _pil_crop, [preprocessor] * len(slow), [encoded[i] for i in slow]
        )
        crops.update(zip(slow, decoded_by_pil, strict=True))
        return crops


@dataclass
class _PreparedChunk:
    """One chunk of a model's jobs ready for the model: checked texts, crops, per-job errors."""

    texts: dict[int, str | None] = field(default_factory=dict)
    crops: dict[int, Crop | None] = field(default_factory=dict)
    errors: dict[int, ClipError] = field(default_factory=dict)
    tokenized: dict[str, Tokenized] = field(default_factory=dict)  # texts tokenized here
    ready: torch.cuda.Event | None = None  # the device crops are made once this has passed


def _checked_text(settings: ClipSettings, text: str | None) -> str | None:
    return None if text is None else check_text(settings, text)


def _pil_crop(preprocessor: ImagePreprocessor, data: bytes) -> np.ndarray | ClipError:
    try:
        return preprocessor.from_bytes(data)
    except ClipError as error:
        return error
