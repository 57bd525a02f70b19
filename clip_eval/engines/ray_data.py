"""The Ray engine: Ray Data ``map_batches`` with a ``LocalScorer`` on each actor.

The input is streamed into Ray by a single read task on the driver's node (``from_torch`` with
``local_read``): the file and the resume position live there, and one sequential reader is what
keeps rows in order. Only the image references and captions travel; the actors (one GPU each
when the cluster has GPUs) load the images and score; results stream back to the driver in input
order (``preserve_order``), which writes them as they arrive.

Actors open the model folders by path, so on a multi-node cluster the BentoML store (or
``--model-dir``) and local image paths must be on storage every node mounts.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import IterableDataset

from clip_eval.datasets import DatasetSpec
from clip_eval.engines.local import LocalConfig, LocalScorer
from clip_eval.images import as_transportable
from clip_eval.records import Outcome, Pair, is_missing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayConfig:
    local: LocalConfig
    address: str | None = None  # None: start a local Ray (unless one is already initialised)
    actors: int | None = None  # None: one per GPU, or one without GPUs
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0


class _Pairs(IterableDataset):  # type: ignore[type-arg]
    """The remaining pairs as rows of text (a Ray column must not mix str and bytes)."""

    def __init__(self, dataset: DatasetSpec, skip: int, rows: int) -> None:
        self.dataset = dataset
        self.skip = skip
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for pairs in self.dataset.iter_pairs(self.rows, self.skip):
            for pair in pairs:
                yield {
                    "image": as_transportable(pair.image),
                    "caption": pair.caption,
                    "references": None if pair.references is None else list(pair.references),
                    "image_2": as_transportable(pair.image_2),
                    "text_2": pair.text_2,
                }


class _ScoreActor:
    """Loads the models once per actor (on its GPU, if Ray gave it one)."""

    def __init__(self, config: LocalConfig) -> None:
        self.scorer = LocalScorer(config)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        pairs = [
            Pair(
                item["image"],
                _value(item, "caption"),
                None if _value(item, "references") is None else tuple(item["references"]),
                _value(item, "image_2"),
                _value(item, "text_2"),
            )
            for item in batch["item"]
        ]
        outcomes = self.scorer.score(pairs)
        # Every field of Outcome as a column (embeddings as lists: Arrow has no ragged tensors).
        return pd.DataFrame(
            {
                name: [_plain(getattr(outcome, name)) for outcome in outcomes]
                for name in OUTCOME_FIELDS
            }
        )


class RayEngine:
    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self.models = config.local.models

    def untrained_models(self) -> list[str]:
        from clip_eval.engines.local import untrained_in

        return untrained_in(self.config.local.model_dirs)

    def run(self, dataset: DatasetSpec, skip: int) -> Generator[list[Outcome], None, None]:
        import ray
        import ray.data

        # Ray's INFO lines (start-up, execution plans) would tear through the progress bar.
        level = logging.INFO if logger.isEnabledFor(logging.INFO) else logging.WARNING
        logging.getLogger("ray.data").setLevel(level)
        started_here = not ray.is_initialized()
        if started_here:
            if self.config.address is None:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=level)
            else:
                ray.init(address=self.config.address, log_to_driver=False, logging_level=level)
        try:
            context = ray.data.DataContext.get_current()
            context.execution_options.preserve_order = True  # output rows follow input rows
            context.enable_progress_bars = False  # the CLI draws its own
            gpus, actors = self._resources(ray.cluster_resources())
            logger.info(
                "ray: %d actor(s), %.2g CPU and %.2g GPU each",
                actors,
                self.config.cpus_per_actor,
                gpus,
            )
            pairs = ray.data.from_torch(
                _Pairs(dataset, skip, self.config.local.batch_size), local_read=True
            )
            scored = pairs.map_batches(
                _ScoreActor,
                fn_constructor_kwargs={"config": self.config.local},
                batch_size=self.config.local.batch_size,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=self.config.cpus_per_actor,
                num_gpus=gpus,
            )
            for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
                yield [_outcome(row) for row in batch.to_dict(orient="records")]
        finally:
            if started_here:
                ray.shutdown()

    def _resources(self, cluster: dict[str, Any]) -> tuple[float, int]:
        """GPUs per actor and the number of actors, from the flags or the cluster."""
        available_gpus = float(cluster.get("GPU", 0))
        gpus = self.config.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if available_gpus >= 1 else 0.0
        actors = self.config.actors
        if actors is None:
            actors = max(1, int(available_gpus // gpus)) if gpus > 0 else 1
        return gpus, actors


OUTCOME_FIELDS = tuple(field.name for field in fields(Outcome))


def _value(row: dict[str, Any], name: str) -> Any:
    item = row.get(name)
    if isinstance(item, list | tuple | np.ndarray):
        return item
    return None if is_missing(item) else item


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _outcome(row: dict[str, Any]) -> Outcome:
    values = {name: _value(row, name) for name in OUTCOME_FIELDS}
    for name in ("image_vector", "text_vector"):
        if values[name] is not None:
            values[name] = np.asarray(values[name], dtype=np.float32)
    for name in ("score", "cosine", "ref_clip_score", "image_image_cosine", "text_text_cosine"):
        if values[name] is not None:
            values[name] = float(values[name])
    return Outcome(**values)
