"""One run: rows in, an engine's outcomes lined up with them, results appended as they come."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import pandas as pd
from tqdm import tqdm

from clip_eval.cli_errors import ClipEvalError
from clip_eval.datasets import DatasetSpec
from clip_eval.embeddings import embeddings_table
from clip_eval.engines import Engine
from clip_eval.output import OutputFile
from clip_eval.records import RESULT_COLUMNS, PairOutcome


@dataclass(frozen=True)
class RunReport:
    rows_total: int
    rows_before: int  # already in the output when this run started (resumed)
    rows_scored: int  # scored by this run
    seconds: float


TEXT_COLUMNS = frozenset({"model", "error", "error_message"})


def result_frame(
    rows: pd.DataFrame,
    outcomes: Sequence[PairOutcome],
    models: int,
    columns: Sequence[str] = RESULT_COLUMNS,
) -> pd.DataFrame:
    """Input rows (each repeated once per model) with the result ``columns`` appended."""
    rows = rows.reset_index(drop=True)
    if models > 1:
        rows = rows.loc[rows.index.repeat(models)].reset_index(drop=True)
    if len(rows) != len(outcomes):
        raise ClipEvalError(f"{len(outcomes)} outcomes for {len(rows)} output rows")
    values = [outcome.columns() for outcome in outcomes]
    # Nullable dtypes: a failed pair's score is null (not NaN) in Parquet and JSON, empty in CSV.
    return rows.assign(
        **{
            name: pd.array(
                [value[name] for value in values],
                dtype="string" if name in TEXT_COLUMNS else "Float64",
            )
            for name in columns
        }
    )


class RowAligner:
    """Matches outcomes, arriving in batches of any size, with the input rows they belong to
    (read here, in the same order): complete rows are handed out as soon as they are known."""

    def __init__(
        self,
        inputs: Iterator[pd.DataFrame],
        models: Sequence[str],
        columns: Sequence[str] = RESULT_COLUMNS,
    ) -> None:
        self.inputs = inputs
        self.models = models
        self.columns = columns
        self.current: pd.DataFrame | None = None
        self.waiting: list[PairOutcome] = []

    def add(
        self, outcomes: Sequence[PairOutcome]
    ) -> Iterator[tuple[pd.DataFrame, int, list[PairOutcome]]]:
        """Result rows ready to write, how many input rows they cover, and their outcomes."""
        width = len(self.models)
        self.waiting.extend(outcomes)
        while len(self.waiting) >= width:
            if self.current is None or self.current.empty:
                self.current = next(self.inputs, None)
                if self.current is None:
                    return
            done = min(len(self.waiting) // width, len(self.current))
            ready = self.waiting[: done * width]
            for index, outcome in enumerate(ready):
                if outcome.model != self.models[index % width]:  # an engine bug
                    raise ClipEvalError(f"outcome for {outcome.model} out of order")
            yield result_frame(self.current.iloc[:done], ready, width, self.columns), done, ready
            self.current = self.current.iloc[done:]
            del self.waiting[: done * width]

    def unmatched(self) -> bool:
        """Outcomes without rows, or rows without outcomes, once the engine is done."""
        rows_left = self.current is not None and not self.current.empty
        return bool(self.waiting) or rows_left or next(self.inputs, None) is not None


def evaluate(
    dataset: DatasetSpec,
    engine: Engine,
    output: OutputFile,
    *,
    batch_size: int,
    progress: bool = True,
) -> RunReport:
    """Score every row not yet in ``output``; on any interruption, what was written stays."""
    width = len(engine.models)
    total = dataset.count_rows()
    before = output.rows_done
    if before > total:
        raise ClipEvalError(
            f"{output.path} holds {before} rows but the input has {total}; "
            "pass --overwrite to start again"
        )
    started = time.perf_counter()
    columns = dataset.result_columns()
    aligner = RowAligner(dataset.iter_chunks(batch_size, before), engine.models, columns)
    with tqdm(
        total=total * width,
        initial=before * width,
        unit="pair",
        desc="scoring",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    ) as bar:
        if before < total:
            # closing(): the engine's pools, client or Ray are released now, even on Ctrl-C.
            with closing(engine.score_dataset(dataset, before)) as batches:
                for outcomes in batches:
                    for rows, done, scored in aligner.add(outcomes):
                        vectors = None
                        if output.embeddings is not None:
                            vectors = embeddings_table(output.rows_done, scored, width)
                        output.append(rows, done, vectors)
                        bar.update(len(rows))
    if aligner.unmatched():
        raise ClipEvalError(f"the engine returned outcomes for {output.rows_done} of {total} rows")
    if output.rows_done == 0:  # an empty input still gets a header (CSV) or schema (Parquet)
        empty = pd.DataFrame(columns=dataset.columns())
        output.append(result_frame(empty, [], 1, columns), 0)
    output.finish()
    return RunReport(total, before, output.rows_done - before, time.perf_counter() - started)
