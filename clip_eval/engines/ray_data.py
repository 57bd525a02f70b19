"""The Ray engine: Ray Data ``map_batches`` with a ``LocalScorer`` on each actor.

The input is read by a single read task pinned to the driver's node: the file and the resume
position live there, and one sequential reader is what keeps rows in order. Rows of paths and
captions are small, so Ray Data would gather them into one block, which one actor would score
alone; the read asks for one block per batch instead (``override_num_blocks``: Ray Data splits
the reader's output), and the actor pool deals the blocks out to every actor. Only the image
references and captions travel; the actors (one per GPU, else one per ``cpus_per_actor`` CPUs of
the cluster) read the images and score; results stream back to the driver in input order
(``preserve_order``), which writes them as they arrive.

Actors open the model folders and local image paths by path, so on a multi-node cluster the
BentoML store (or ``--model-dir``) and the images must be on storage every node mounts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from clip_eval.cli_errors import ClipEvalError
from clip_eval.datasets import DatasetSpec
from clip_eval.engines.local import LocalConfig, LocalScorer
from clip_eval.image_cells import as_transportable, local_path
from clip_eval.records import Pair, PairOutcome, is_missing
from clip_runtime.errors import ModelStoreError

logger = logging.getLogger(__name__)

# How long the run waits for every actor to load its models before the first batch is dealt
# out: starting them all first is what spreads the batches over all of them.
ACTOR_START_TIMEOUT_S = 600
# Ray's own label of every node, which pins the read task to the driver's node.
NODE_ID_LABEL = "ray.io/node-id"
# Columns an actor adds for the driver alone (never written to the output).
ACTOR_COLUMN = "_ray_actor"  # which actor scored the row: the driver counts rows per actor
UNREACHABLE_COLUMN = "_ray_missing_paths"  # local image paths the actor's node could not find
MODEL_STORE = "the BentoML model store (BENTOML_HOME) or --model-dir"
SHARED_STORAGE = "with --engine ray, {what} must be on storage every node mounts, at the same path"


@dataclass(frozen=True)
class RayConfig:
    local: LocalConfig
    address: str | None = None  # None: start a local Ray (unless one is already initialised)
    actors: int | None = None  # None: one per GPU, else one per cpus_per_actor CPUs
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0


class ActorStartError(ClipEvalError):
    """An actor could not open what it needs (the model store): the run cannot go on."""


PAIR_SCHEMA = pa.schema(
    [
        ("image", pa.string()),
        ("caption", pa.string()),
        ("references", pa.list_(pa.string())),
        ("image_2", pa.string()),
        ("text_2", pa.string()),
    ]
)


def _pairs_source(dataset: DatasetSpec, skip: int, rows: int) -> Any:
    """The remaining pairs as one read task, a table of text per batch (image bytes become
    ``data:`` URIs: a column must not mix str and bytes)."""
    from ray.data.block import BlockMetadata
    from ray.data.context import DataContext
    from ray.data.datasource import Datasource, ReadTask

    def read() -> Iterator[pa.Table]:
        for pairs in dataset.iter_pairs(rows, skip):
            yield pa.Table.from_pylist([_pair_row(pair) for pair in pairs], schema=PAIR_SCHEMA)

    class PairsSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self,
            parallelism: int,
            per_task_row_limit: int | None = None,
            data_context: DataContext | None = None,
            **_: Any,
        ) -> list[ReadTask]:
            # One sequential reader, whatever the parallelism asked: Ray Data then splits its
            # output into that many blocks.
            unknown = BlockMetadata(
                num_rows=None, size_bytes=None, input_files=None, exec_stats=None
            )
            return [ReadTask(read, unknown)]

    return PairsSource()


def _pair_row(pair: Pair) -> dict[str, Any]:
    return {
        "image": as_transportable(pair.image),
        "caption": pair.caption,
        "references": None if pair.references is None else list(pair.references),
        "image_2": as_transportable(pair.image_2),
        "text_2": pair.text_2,
    }


class _ScoreActor:
    """Loads the models once per actor (on its GPU, if Ray gave it one), with as many threads
    as it was given CPUs."""

    def __init__(self, config: LocalConfig) -> None:
        import ray
        import torch

        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 1.0)
        threads = max(1, int(cpus))
        torch.set_num_threads(threads)
        config = dataclasses.replace(
            config, settings={"decode_workers": threads, **config.settings}
        )
        node = f"{context.get_node_id()[:8]} ({ray.util.get_node_ip_address()})"
        self.name = f"node {node} pid {os.getpid()}"
        try:
            self.scorer = LocalScorer(config)
        except (ModelStoreError, OSError) as error:
            raise ActorStartError(
                f"the Ray actor on node {node} cannot open the model store: {error}; "
                + SHARED_STORAGE.format(what=MODEL_STORE)
            ) from error

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        pairs = [
            Pair(
                item["image"],
                _value(item, "caption"),
                None if _value(item, "references") is None else tuple(item["references"]),
                _value(item, "image_2"),
                _value(item, "text_2"),
            )
            for item in batch.to_dict(orient="records")
        ]
        outcomes = self.scorer.score(pairs)
        width = len(self.scorer.models)
        # Every field of PairOutcome as a column (embeddings as lists: Arrow has no ragged tensors).
        columns: dict[str, list[Any]] = {
            name: [_plain(getattr(outcome, name)) for outcome in outcomes]
            for name in OUTCOME_FIELDS
        }
        columns[ACTOR_COLUMN] = [self.name] * len(outcomes)
        columns[UNREACHABLE_COLUMN] = [
            self._missing_paths(pairs[index // width], outcome)
            for index, outcome in enumerate(outcomes)
        ]
        return pd.DataFrame(columns)

    def _missing_paths(self, pair: Pair, outcome: PairOutcome) -> list[str] | None:
        """The pair's local image paths this node cannot see, when that is why it failed."""
        if outcome.error != "image_not_found":
            return None
        loader = self.scorer.config.loader
        paths = (local_path(value, loader) for value in (pair.image, pair.image_2))
        return [str(path) for path in paths if path is not None and not path.exists()] or None


class RayEngine:
    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self.models = config.local.models
        self.rows_per_actor: Counter[str] = Counter()  # outcomes each actor returned, last run

    def untrained_models(self) -> list[str]:
        from clip_eval.engines.local import untrained_in

        return untrained_in(self.config.local.model_dirs)

    def score_dataset(
        self, dataset: DatasetSpec, skip: int
    ) -> Generator[list[PairOutcome], None, None]:
        import ray

        # Ray's INFO lines (start-up, execution plans) would tear through the progress bar.
        level = logging.INFO if logger.isEnabledFor(logging.INFO) else logging.WARNING
        logging.getLogger("ray.data").setLevel(level)
        started_here = not ray.is_initialized()
        if started_here:
            if self.config.address is None:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level=level)
            else:
                ray.init(address=self.config.address, log_to_driver=False, logging_level=level)
        self.rows_per_actor.clear()
        try:
            yield from self._score(dataset, skip)
        except ray.exceptions.RayError as error:
            start_error = _start_error(error)
            if start_error is None:
                raise
            raise start_error from None
        finally:
            if self.rows_per_actor:
                logger.info("ray: outcomes per actor: %s", dict(self.rows_per_actor))
            if started_here:
                ray.shutdown()

    def _score(self, dataset: DatasetSpec, skip: int) -> Iterator[list[PairOutcome]]:
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # output rows follow input rows
        context.enable_progress_bars = False  # the CLI draws its own
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        # Blocks hold paths and captions, not images: where a block lies does not matter, so
        # batches go to whichever actor is free rather than to the one on the reader's node.
        context.execution_options.actor_locality_enabled = False
        gpus, actors = self._resources(_alive_nodes())
        logger.info(
            "ray: %d actor(s), %.2g CPU and %.2g GPU each",
            actors,
            self.config.cpus_per_actor,
            gpus,
        )
        batch_size = self.config.local.batch_size
        remaining = dataset.count_rows() - skip
        # The read task runs where the input file is (this node) and takes no CPU from the
        # actors; its output is cut into one block per batch, which the pool deals out.
        pairs = ray.data.read_datasource(
            _pairs_source(dataset, skip, batch_size),
            override_num_blocks=max(1, math.ceil(remaining / batch_size)),
            num_cpus=0,
            label_selector={NODE_ID_LABEL: ray.get_runtime_context().get_node_id()},
        )
        scored = pairs.map_batches(
            _ScoreActor,
            fn_constructor_kwargs={"config": self.config.local},
            batch_size=batch_size,
            batch_format="pandas",
            # One batch at a time per actor: none waits behind a busy actor while another idles.
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=self.config.cpus_per_actor,
            num_gpus=gpus,
        )
        for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
            self.rows_per_actor.update(batch[ACTOR_COLUMN])
            yield [
                _explain_unreachable(_outcome(row), row[UNREACHABLE_COLUMN])
                for row in batch.to_dict(orient="records")
            ]

    def _resources(self, nodes: list[dict[str, float]]) -> tuple[float, int]:
        """GPUs per actor and the number of actors, from the flags or the cluster's nodes (an
        actor lives on one node, so each node holds as many as fit in its own resources)."""
        cpus = self.config.cpus_per_actor
        gpus = self.config.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if any(node.get("GPU", 0) >= 1 for node in nodes) else 0.0
        actors = self.config.actors
        if actors is None:
            per_node = (
                int(node.get("GPU", 0) // gpus) if gpus > 0 else int(node.get("CPU", 0) // cpus)
                for node in nodes
            )
            actors = max(1, sum(per_node))
        return gpus, actors


OUTCOME_FIELDS = tuple(field.name for field in fields(PairOutcome))


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _start_error(error: BaseException) -> ActorStartError | None:
    """An actor's start error, from the error Ray raised: a dead actor's error carries only the
    text of its creation task's traceback, whose last line is ours."""
    if isinstance(error, ActorStartError):
        return ActorStartError(str(error))
    marker = f"{ActorStartError.__name__}: "
    text = str(error)
    if marker not in text:
        return None
    return ActorStartError(text.rsplit(marker, 1)[1].strip().splitlines()[0])


def _explain_unreachable(outcome: PairOutcome, missing: Any) -> PairOutcome:
    """A file the actor's node did not find but the driver's does: say it is a storage problem."""
    if missing is None or len(missing) == 0:
        return outcome
    here = [path for path in missing if Path(path).exists()]
    if not here:
        return outcome
    message = (
        f"image file not found on the Ray node that read it: {here[0]} (it exists where "
        f"clip-eval runs); " + SHARED_STORAGE.format(what="image paths")
    )
    return dataclasses.replace(outcome, error_message=message)


def _value(row: dict[str, Any], name: str) -> Any:
    item = row.get(name)
    if isinstance(item, list | tuple | np.ndarray):
        return item
    return None if is_missing(item) else item


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _outcome(row: dict[str, Any]) -> PairOutcome:
    values = {name: _value(row, name) for name in OUTCOME_FIELDS}
    for name in ("image_vector", "text_vector"):
        if values[name] is not None:
            values[name] = np.asarray(values[name], dtype=np.float32)
    for name in ("score", "cosine", "ref_clip_score", "image_image_cosine", "text_text_cosine"):
        if values[name] is not None:
            values[name] = float(values[name])
    return PairOutcome(**values)
