"""``--embeddings-out``: each scored pair's image and caption embeddings (L2-normalized float32),
with the input row they belong to, written beside the scores.

Like Parquet outputs, they go to complete part files in ``PATH.parts/`` as rows are scored (the
run state counts them, so a resumed run drops a part written after the last state update), and
are merged into ``PATH`` at the end:

- ``.parquet``: columns ``row`` (0-based input row), ``model``, ``image_embedding``,
  ``text_embedding``; merged part by part (memory stays flat).
- ``.npz``: per model, arrays ``MODEL/row`` (int64), ``MODEL/image`` and ``MODEL/text`` (float32,
  rows x dim); ``.npy`` (one model): a structured array with fields ``row``, ``image``, ``text``.
  Both are built in memory at the end.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clip_eval.cli_errors import UsageError
from clip_eval.parts import PartFiles
from clip_eval.records import PairOutcome

EmbeddingsFormat = Literal["parquet", "npz", "npy"]
SUFFIXES: dict[str, EmbeddingsFormat] = {".parquet": "parquet", ".npz": "npz", ".npy": "npy"}
SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("model", pa.string()),
        ("image_embedding", pa.list_(pa.float32())),
        ("text_embedding", pa.list_(pa.float32())),
    ]
)


def embeddings_format(path: Path, models: int) -> EmbeddingsFormat:
    found = SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise UsageError(f"--embeddings-out: use one of {', '.join(SUFFIXES)}, not {path.name}")
    if found == "npy" and models > 1:
        raise UsageError("--embeddings-out: a .npy file holds one model's; use .npz or .parquet")
    return found


def embeddings_table(first_row: int, outcomes: Sequence[PairOutcome], models: int) -> pa.Table:
    """The embeddings of the scored outcomes among ``outcomes`` (``models`` per input row,
    the first of them input row ``first_row``)."""
    rows, names, images, texts = [], [], [], []
    for index, outcome in enumerate(outcomes):
        if outcome.image_vector is None or outcome.text_vector is None:
            continue  # a failed pair has no embeddings
        rows.append(first_row + index // models)
        names.append(outcome.model)
        images.append(outcome.image_vector)
        texts.append(outcome.text_vector)
    return pa.table([rows, names, images, texts], schema=SCHEMA)


class EmbeddingsFile:
    def __init__(self, path: Path, fmt: EmbeddingsFormat) -> None:
        self.path = path
        self.format = fmt
        self.parts = PartFiles(path.with_name(path.name + ".parts"))

    def exists(self) -> bool:
        return self.path.exists() or self.parts.folder.exists()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.parts.folder, ignore_errors=True)

    def finish(self) -> None:
        """Merge the parts into ``path``."""
        files = self.parts.files()
        temporary = self.path.with_name(self.path.name + ".tmp" + self.path.suffix)
        if self.format == "parquet":
            with pq.ParquetWriter(temporary, SCHEMA) as writer:
                for file in files:
                    writer.write_table(pq.read_table(file, schema=SCHEMA))
        else:
            tables = [pq.read_table(file, schema=SCHEMA) for file in files]
            table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
            frame = table.to_pandas()
            if self.format == "npz":
                # numpy's stub checks `**` keys against `allow_pickle` too; ours are "model/field".
                # numpy's stub types **kwds against its own `allow_pickle: bool` keyword.
                np.savez(temporary, **_arrays_by_model(frame))  # type: ignore[arg-type]
            else:
                np.save(temporary, _structured(frame))
        os.replace(temporary, self.path)
        shutil.rmtree(self.parts.folder, ignore_errors=True)


def _stack(values: pd.Series) -> np.ndarray:
    if values.empty:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in values])


def _arrays_by_model(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for model, group in frame.groupby("model", sort=False):
        arrays[f"{model}/row"] = group["row"].to_numpy(dtype=np.int64)
        arrays[f"{model}/image"] = _stack(group["image_embedding"])
        arrays[f"{model}/text"] = _stack(group["text_embedding"])
    return arrays


def _structured(frame: pd.DataFrame) -> np.ndarray:
    images, texts = _stack(frame["image_embedding"]), _stack(frame["text_embedding"])
    dim = images.shape[1]
    vector = (np.float32, (dim,))
    dtype = np.dtype([("row", np.int64), ("image", *vector), ("text", *vector)])
    array = np.zeros(len(frame), dtype=dtype)
    if len(frame):
        array["row"], array["image"], array["text"] = frame["row"], images, texts
    return array
