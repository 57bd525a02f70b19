"""The in-process engine: ``clip_runtime`` on this machine, models from the BentoML store.

``LocalScorer`` is also what each Ray actor runs, so both engines score identically.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clip_eval.datasets import DatasetSpec
from clip_eval.errors import UsageError
from clip_eval.images import ImageLoader, LoaderConfig
from clip_eval.records import Outcome, Pair
from clip_runtime import ClipEngine, ClipError, ClipSettings, Job
from clip_runtime.model_entry import read_entry, store_name


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
        return {models[0]: model_dir}
    import bentoml

    folders: dict[str, Path] = {}
    for name in models:
        tag = store_name(name)
        try:
            folders[name] = Path(bentoml.models.get(tag).path)
        except bentoml.exceptions.NotFound as exc:
            raise UsageError(
                f"model {name} ({tag}) is not in the BentoML model store ({exc}); save it with "
                "`python scripts/save_models.py --models NAME` (add --random-init offline), "
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
    settings: dict[str, Any] = field(default_factory=dict)  # more ClipSettings overrides

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

    def load(self, pairs: Sequence[Pair]) -> list[Future[tuple[bytes, str] | ClipError]]:
        """Start fetching a batch's images; the caller scores the previous batch meanwhile."""
        return [self.io_pool.submit(self.loader.load_pair, pair) for pair in pairs]

    def score_loaded(
        self, loaded: Sequence[Future[tuple[bytes, str] | ClipError]]
    ) -> list[Outcome]:
        ready = [future.result() for future in loaded]
        jobs = [
            Job(model, image=item[0], text=item[1])
            for item in ready
            if not isinstance(item, ClipError)
            for model in self.models
        ]
        results = iter(self.engine.run(jobs)[0])
        outcomes: list[Outcome] = []
        for item in ready:
            for model in self.models:
                result = item if isinstance(item, ClipError) else next(results)
                if isinstance(result, ClipError):
                    outcomes.append(Outcome.failed(model, result))
                elif result.error is not None:
                    outcomes.append(Outcome.failed(model, result.error))
                else:
                    outcomes.append(Outcome.scored(model, result.cosine or 0.0, result.score))
        return outcomes

    def score(self, pairs: Sequence[Pair]) -> list[Outcome]:
        return self.score_loaded(self.load(pairs))


class LocalEngine:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.models = config.models

    def run(self, dataset: DatasetSpec, skip: int) -> Generator[list[Outcome], None, None]:
        scorer = LocalScorer(self.config)
        try:
            previous: list[Future[tuple[bytes, str] | ClipError]] | None = None
            for pairs in dataset.iter_pairs(self.config.batch_size, skip):
                loading = scorer.load(pairs)  # overlaps with scoring the previous batch
                if previous is not None:
                    yield scorer.score_loaded(previous)
                previous = loading
            if previous is not None:
                yield scorer.score_loaded(previous)
        finally:
            scorer.close()
