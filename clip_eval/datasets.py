"""Input datasets: CSV, JSONL or Parquet tables of image-caption pairs, WebDataset shards or
Hugging Face ``datasets`` folders (``clip_eval.shards``), read in chunks.

Chunked reading keeps memory flat for any size of input, and the same reader serves the engines
(pairs) and the output writer (whole rows) in the same order, which is what resuming relies on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from clip_eval import shards
from clip_eval.cli_errors import UsageError
from clip_eval.records import (
    RESULT_COLUMNS,
    Pair,
    caption_of,
    is_missing,
    references_of,
    result_columns,
)

logger = logging.getLogger(__name__)

TableFormat = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[TableFormat, ...] = ("csv", "jsonl", "parquet")
# Inputs only: the output is always a table.
InputFormat = Literal["csv", "jsonl", "parquet", "webdataset", "hf"]
INPUT_FORMATS: tuple[InputFormat, ...] = (*FORMATS, "webdataset", "hf")
_LAYOUTS: dict[str, InputFormat] = {"webdataset": "webdataset", "hf": "hf"}
_SUFFIXES: dict[str, TableFormat] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Spreadsheet exports start with a byte-order mark, which would otherwise stick to the first name.
CSV_ENCODING = "utf-8-sig"
# Rows parsed per read; handed on in slices of the batch size (parsing in tiny chunks is slow).
READ_ROWS = 8192


def detect_format(path: Path, explicit: str | None = None) -> TableFormat:
    """The table format named by ``explicit`` or by the file suffix."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise UsageError(f"unknown format {explicit!r}; choose one of {', '.join(FORMATS)}")
        return explicit
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise UsageError(
            f"cannot tell the format of {path} from its suffix; use one of "
            f"{', '.join(sorted(_SUFFIXES))} or say it with --input-format/--output-format"
        )
    return found


def detect_input_format(path: Path, explicit: str | None = None) -> InputFormat:
    """``explicit``, else a Hugging Face ``save_to_disk`` folder, WebDataset shards (a ``.tar`` or
    a folder of them), or a table by its suffix."""
    if explicit is not None and explicit in _LAYOUTS:
        return _LAYOUTS[explicit]
    if explicit is None and shards.is_hf_folder(path):
        return "hf"
    if explicit is None and shards.is_webdataset(path):
        return "webdataset"
    return detect_format(path, explicit)


@dataclass(frozen=True)
class DatasetSpec:
    """Where the pairs are and which columns hold them. Picklable: Ray read tasks get a copy."""

    path: Path
    format: InputFormat
    image_column: str = "image"
    caption_column: str = "caption"
    reference_column: str | None = None
    image_column_2: str | None = None  # a second image, compared with the first
    text_column_2: str | None = None  # a second text, compared with the caption

    def result_columns(self) -> tuple[str, ...]:
        return result_columns(
            self.reference_column is not None,
            self.image_column_2 is not None,
            self.text_column_2 is not None,
        )

    # -- checks -----------------------------------------------------------------------------

    def columns(self) -> list[str]:
        """The input's column names (JSONL: the keys of its first rows)."""
        if self.format == "webdataset":
            return list(shards.WEBDATASET_COLUMNS)
        if self.format == "hf":
            return shards.hf_columns(self.path)
        if self.format == "csv":
            return list(pd.read_csv(self.path, nrows=0, encoding=CSV_ENCODING).columns)
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(self.path).names)
        first = next(self._raw_chunks(1000), None)
        return [] if first is None else list(first.columns)

    def validate(self) -> list[str]:
        """The columns, once the file is known to exist and to have the named ones."""
        if not self.path.exists():
            raise UsageError(f"input file not found: {self.path}")
        if not self.path.is_file() and self.format not in ("webdataset", "hf"):
            raise UsageError(f"input is not a file: {self.path}")
        try:
            columns = self.columns()
        except (ValueError, OSError) as exc:  # pandas/pyarrow parse errors are ValueErrors
            raise UsageError(f"cannot read {self.path} as {self.format}: {exc}") from exc
        wanted = {
            "image column (--image-column)": self.image_column,
            "caption column (--caption-column)": self.caption_column,
        }
        optional = {
            "reference column (--reference-column)": self.reference_column,
            "second image column (--image-column-2)": self.image_column_2,
            "second text column (--text-column-2)": self.text_column_2,
        }
        wanted.update((what, name) for what, name in optional.items() if name is not None)
        for what, name in wanted.items():
            if name not in columns:
                raise UsageError(
                    f"{self.path} has no {what} {name!r}; its columns are: "
                    f"{', '.join(map(str, columns)) or '(none)'}"
                )
        taken = [name for name in RESULT_COLUMNS if name in columns]
        if taken:
            raise UsageError(
                f"{self.path} already has column(s) {', '.join(taken)}, which the output adds; "
                "rename or drop them first"
            )
        return columns

    # -- reading ----------------------------------------------------------------------------

    def count_rows(self) -> int:
        """Rows in the input (for the progress bar's ETA): Parquet from its footer, others by a
        pass over the file, which is cheap next to scoring."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(self.path).metadata.num_rows)
        if self.format in ("webdataset", "hf"):
            return sum(len(frame) for frame in self._raw_chunks(READ_ROWS))
        if self.format == "jsonl":
            with self.path.open("rb") as handle:
                return sum(1 for line in handle if line.strip())
        return sum(
            len(chunk)
            for chunk in pd.read_csv(
                self.path,
                usecols=[self.image_column],
                dtype=str,
                chunksize=READ_ROWS,
                encoding=CSV_ENCODING,
            )
        )

    def _raw_chunks(self, rows: int) -> Iterator[pd.DataFrame]:
        if self.format == "webdataset":
            yield from shards.webdataset_chunks(self.path, rows)
        elif self.format == "hf":
            yield from shards.hf_chunks(self.path, rows)
        elif self.format == "csv":
            # Every cell as text, and no NA guessing: an empty caption stays "" (scored as
            # empty_text, like the service), and pass-through columns are written back unchanged.
            yield from pd.read_csv(
                self.path, dtype=str, keep_default_na=False, chunksize=rows, encoding=CSV_ENCODING
            )
        elif self.format == "jsonl":
            # dtype=False: values stay what the JSON says (no date or number guessing).
            with pd.read_json(
                self.path,
                lines=True,
                chunksize=rows,
                dtype=False,
                convert_dates=False,
                encoding="utf-8",
            ) as reader:
                yield from reader
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self.path) as parquet:
                for batch in parquet.iter_batches(batch_size=rows):
                    yield batch.to_pandas()

    def iter_chunks(self, rows: int, skip: int = 0) -> Iterator[pd.DataFrame]:
        """Whole input rows in order, ``rows`` at a time, after the first ``skip`` rows."""
        columns: list[str] | None = None
        for frame in self._raw_chunks(max(rows, READ_ROWS)):
            if columns is None:
                columns = list(frame.columns)
            elif list(frame.columns) != columns:
                # JSONL rows may differ in keys; the output keeps the first rows' columns.
                extra = [name for name in frame.columns if name not in columns]
                if extra:
                    logger.warning("ignoring keys absent from the first rows: %s", extra)
                frame = frame.reindex(columns=columns)
            if skip >= len(frame):
                skip -= len(frame)
                continue
            frame = frame.iloc[skip:].reset_index(drop=True)
            skip = 0
            for start in range(0, len(frame), rows):
                yield frame.iloc[start : start + rows].reset_index(drop=True)

    def iter_pairs(self, rows: int, skip: int = 0) -> Iterator[list[Pair]]:
        """The image-caption pairs of ``iter_chunks``, batch by batch."""
        for frame in self.iter_chunks(rows, skip):
            yield self.pairs_of(frame)

    def pairs_of(self, frame: pd.DataFrame) -> list[Pair]:
        def column(name: str | None) -> list[object]:
            if name is None or name not in frame:
                return [None] * len(frame)
            return frame[name].tolist()

        return [
            Pair(
                None if is_missing(image) else image,
                caption_of(caption),
                None if self.reference_column is None else references_of(references),
                None if is_missing(image_2) else image_2,
                caption_of(text_2),
            )
            for image, caption, references, image_2, text_2 in zip(
                column(self.image_column),
                column(self.caption_column),
                column(self.reference_column),
                column(self.image_column_2),
                column(self.text_column_2),
                strict=True,
            )
        ]
