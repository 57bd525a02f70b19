"""The in-process engine: ``clip_runtime`` on this machine, models from the BentoML store.

``LocalScorer`` is also what each Ray actor runs, so both engines score identically.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clip_eval.cli_errors import UsageError
from clip_eval.datasets import DatasetSpec
from clip_eval.image_cells import ImageLoader, LoaderConfig
from clip_eval.records import LoadedPair, Pair, PairOutcome, need_vector, similarity
from clip_runtime import ClipEngine, ClipError, ClipSettings, Job, JobOutcome
from clip_runtime.model_entry import read_entry, store_name
from clip_runtime.scoring import ref_clip_score


def resolve_model_dirs(models: Sequence[str], model_dir: Path | None) -> dict[str, Path]:
    """Each model's store entry folder: ``model_dir`` for a single model, else the BentoML
    store's latest ``clip-<architecture>`` (``BENTOML_HOME``), as the service resolves it."""
    if model_dir is not None:
        if len(models) != 1:
            raise UsageError("--model-dir applies to one model; name exactly one --model")
        try:
            read_entry(model_dir)
        except ClipError as error:
            raise UsageError(f"--model-dir: {error.message}") from error
        return {models[0]: model_dir.resolve()}  # absolute: Ray actors run in other folders
    import bentoml

    folders: dict[str, Path] = {}
    for name in models:
        tag = store_name(name)
        try:
            folders[name] = Path(bentoml.models.get(tag).path)
        except bentoml.exceptions.NotFound as exc:
            raise UsageError(
                f"model {name} ({tag}) is not in the BentoML model store ({exc}); save it with "
                "`python -m scripts.save_models --models NAME` (add --random-init offline), "
                "set BENTOML_HOME, or pass --model-dir"
            ) from exc
    return folders


@dataclass(frozen=True)
class LocalConfig:
    """Everything a scorer needs; picklable, so Ray ships it to the actors."""

    models: tuple[str, ...]
    model_dirs: dict[str, Path]
    loader: LoaderConfig
    batch_size: int = 32
    io_workers: int = 16
    device: str | None = None  # None: CLIP_DEVICE, else auto
    precision: str | None = None  # None: CLIP_PRECISION, else auto
    runtime: str | None = None  # None: CLIP_RUNTIME, else auto
    settings: dict[str, Any] = field(default_factory=dict)  # more ClipSettings overrides
    keep_vectors: bool = False  # outcomes carry the pair's embeddings (--embeddings-out)

    def clip_settings(self) -> ClipSettings:
        overrides: dict[str, Any] = {
            "models": list(self.models),
            "default_model": self.models[0],
            "max_batch_size": self.batch_size,
            **self.settings,
        }
        if self.device is not None:
            overrides["device"] = self.device
        if self.precision is not None:
            overrides["precision"] = self.precision
        if self.runtime is not None:
            overrides["runtime"] = self.runtime
        return ClipSettings(**overrides)


class LocalScorer:
    """Loaded models plus an I/O pool (files, URLs); the engine decodes in its own pool."""

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.models = config.models
        self.settings = config.clip_settings()
        self.engine = ClipEngine(self.settings, config.model_dirs)
        self.loader = ImageLoader(config.loader)
        self.io_pool = ThreadPoolExecutor(config.io_workers, thread_name_prefix="clip-eval-io")

    def close(self) -> None:
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()
        self.loader.close()

    def load(self, pairs: Sequence[Pair]) -> list[Future[LoadedPair | ClipError]]:
        """Start fetching a batch's images; the caller scores the previous batch meanwhile."""
        return [self.io_pool.submit(self.loader.load_pair, pair) for pair in pairs]

    def score_loaded(self, loaded: Sequence[Future[LoadedPair | ClipError]]) -> list[PairOutcome]:
        ready = [future.result() for future in loaded]
        jobs = [
            job
            for item in ready
            if not isinstance(item, ClipError)
            for model in self.models
            for job in self._jobs(model, item)
        ]
        results = iter(self.engine.run_jobs(jobs)[0])
        return [
            PairOutcome.failed(model, item)
            if isinstance(item, ClipError)
            else self._outcome(model, item, results)
            for item in ready
            for model in self.models
        ]

    def _jobs(self, model: str, item: LoadedPair) -> list[Job]:
        """The pair, then its references, second image and second text (embeddings alone)."""
        vectors = self.config.keep_vectors or bool(
            item.references or item.image_2 is not None or item.text_2 is not None
        )
        jobs = [Job(model, image=item.image, text=item.caption, keep_vectors=vectors)]
        jobs.extend(Job(model, text=reference) for reference in item.references or ())
        if item.image_2 is not None:
            jobs.append(Job(model, image=item.image_2))
        if item.text_2 is not None:
            jobs.append(Job(model, text=item.text_2))
        return jobs

    def _outcome(self, model: str, item: LoadedPair, results: Iterator[JobOutcome]) -> PairOutcome:
        """One row's outcome from its jobs' (in ``_jobs``'s order): the scores the service would
        give, RefCLIPScore as its batch endpoint computes it."""
        pair = next(results)
        references = [next(results) for _ in item.references or ()]
        image_2 = next(results) if item.image_2 is not None else None
        text_2 = next(results) if item.text_2 is not None else None
        for result in (pair, *references, image_2, text_2):
            if result is not None and result.error is not None:
                return PairOutcome.failed(model, result.error)
        cosine = pair.cosine or 0.0
        caption = _float32(pair.text_vector)  # None when no embedding was asked for
        ref_score = None
        if references:
            similarities = [similarity(_need(r.text_vector), _need(caption)) for r in references]
            ref_score = ref_clip_score(cosine, similarities)
        return PairOutcome.with_vectors(
            model,
            cosine,
            image=_float32(pair.image_vector),
            caption=caption,
            image_2=None if image_2 is None else _need(image_2.image_vector),
            text_2=None if text_2 is None else _need(text_2.text_vector),
            ref_clip_score=ref_score,
            keep_vectors=self.config.keep_vectors,
        )

    def score(self, pairs: Sequence[Pair]) -> list[PairOutcome]:
        return self.score_loaded(self.load(pairs))


def untrained_in(model_dirs: dict[str, Path]) -> list[str]:
    """The models whose saved entry says random-init."""
    return [name for name, folder in model_dirs.items() if read_entry(folder).untrained]


class LocalEngine:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.models = config.models

    def untrained_models(self) -> list[str]:
        return untrained_in(self.config.model_dirs)

    def score_dataset(
        self, dataset: DatasetSpec, skip: int
    ) -> Generator[list[PairOutcome], None, None]:
        scorer = LocalScorer(self.config)
        try:
            previous: list[Future[LoadedPair | ClipError]] | None = None
            for pairs in dataset.iter_pairs(self.config.batch_size, skip):
                loading = scorer.load(pairs)  # overlaps with scoring the previous batch
                if previous is not None:
                    yield scorer.score_loaded(previous)
                previous = loading
            if previous is not None:
                yield scorer.score_loaded(previous)
        finally:
            scorer.close()


def _float32(vector: np.ndarray | None) -> np.ndarray | None:
    return None if vector is None else vector.astype(np.float32, copy=False)


def _need(vector: np.ndarray | None) -> np.ndarray:
    return need_vector(_float32(vector))
