"""The three ways of scoring: in this process, through the service, on Ray Data actors.

Every engine takes the dataset and the number of rows already done, and yields the outcomes of
the remaining rows in input order (one per row and model, models in the order given), in
batches of any size. The pipeline lines them up with the rows it reads itself.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

from clip_eval.datasets import DatasetSpec
from clip_eval.records import PairOutcome


class Engine(Protocol):
    models: tuple[str, ...]

    def score_dataset(
        self, dataset: DatasetSpec, skip: int
    ) -> Generator[list[PairOutcome], None, None]: ...

    def untrained_models(self) -> list[str]:
        """The models whose weights are random-init (untrained): their scores mean nothing."""
        ...
