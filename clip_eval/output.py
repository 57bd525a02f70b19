"""The output table, written as rows are scored, and the state file that makes resuming safe.

Next to ``OUTPUT`` lives ``OUTPUT.clip-eval.json``: which input and settings the run belongs to,
how many input rows are done, and how far the output is known to be complete. It is replaced
atomically after every append, and only after the rows themselves are written, so after any
interruption (Ctrl-C, a crash, SIGKILL) the state never claims more than the file holds.

- CSV and JSONL are appended to in place; on resume, whatever was written after the last state
  update (a half-written line) is cut off.
- Parquet cannot be appended to, and a file without its footer is unreadable, so rows go to
  complete part files in ``OUTPUT.parts/`` and are merged into ``OUTPUT`` when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clip_eval.cli_errors import ClipEvalError, UsageError
from clip_eval.datasets import TableFormat
from clip_eval.embeddings import EmbeddingsFile
from clip_eval.parts import PartFiles

STATE_SUFFIX = ".clip-eval.json"
PARTS_SUFFIX = ".parts"
STATE_VERSION = 1


@dataclass
class RunState:
    fingerprint: dict[str, Any]
    rows_done: int = 0
    output_bytes: int = 0  # CSV/JSONL: the file's length after the last complete append
    parts: int = 0  # Parquet: complete part files
    embedding_parts: int = 0  # --embeddings-out: complete part files
    complete: bool = False
    version: int = STATE_VERSION

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            raw = json.loads(path.read_text())
            state = cls(**raw)
        except (ValueError, TypeError) as exc:
            raise ClipEvalError(f"{path} is not a clip-eval state file: {exc}") from exc
        if state.version != STATE_VERSION:
            raise ClipEvalError(f"{path} has state version {state.version}; expected 1")
        return state

    def save(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=1))
        os.replace(temporary, path)  # atomic: a reader sees the old state or the new one


def state_path(output: Path) -> Path:
    return output.with_name(output.name + STATE_SUFFIX)


def parts_path(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


@dataclass
class OutputFile:
    path: Path
    format: TableFormat
    state: RunState
    embeddings: EmbeddingsFile | None = None

    @property
    def parts(self) -> PartFiles:
        return PartFiles(parts_path(self.path))

    @classmethod
    def open(
        cls,
        path: Path,
        fmt: TableFormat,
        fingerprint: dict[str, Any],
        *,
        resume: bool,
        overwrite: bool,
        embeddings: EmbeddingsFile | None = None,
    ) -> OutputFile:
        """A fresh output, or the interrupted one to continue (``resume``)."""
        state_file = state_path(path)
        exists = path.exists() or state_file.exists() or parts_path(path).exists()
        exists = exists or (embeddings is not None and embeddings.exists())
        if exists and overwrite:
            path.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
            shutil.rmtree(parts_path(path), ignore_errors=True)
            if embeddings is not None:
                embeddings.remove()
            exists = False
        if exists and not resume:
            raise UsageError(
                f"{path} already exists; pass --resume to continue that run "
                "or --overwrite to start again"
            )
        if not path.parent.is_dir():
            raise UsageError(f"output folder does not exist: {path.parent}")
        if not exists:
            state = RunState(fingerprint=fingerprint)
            if fmt != "parquet":
                path.write_bytes(b"")
            state.save(state_file)
            return cls(path, fmt, state, embeddings)
        if not state_file.exists():
            raise UsageError(
                f"{path} exists but {state_file.name} does not, so what it holds is unknown; "
                "pass --overwrite to start again"
            )
        state = RunState.load(state_file)
        changed = {
            key: (state.fingerprint.get(key), fingerprint.get(key))
            for key in {**state.fingerprint, **fingerprint}
            if state.fingerprint.get(key) != fingerprint.get(key)
        }
        if changed:
            details = "; ".join(
                f"{key}: was {old!r}, now {new!r}" for key, (old, new) in changed.items()
            )
            raise UsageError(
                f"cannot resume {path}: the run was started with other settings ({details}); "
                "rerun with the same ones, or pass --overwrite to start again"
            )
        output = cls(path, fmt, state, embeddings)
        output._cut_back()
        return output

    @property
    def rows_done(self) -> int:
        return self.state.rows_done

    def _cut_back(self) -> None:
        """Drop whatever was written after the last state update (an interrupted append)."""
        if self.state.complete:
            return
        if self.embeddings is not None:
            self.embeddings.parts.cut_back(self.state.embedding_parts)
        if self.format == "parquet":
            self.parts.cut_back(self.state.parts)
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.state.output_bytes:
            raise ClipEvalError(
                f"{self.path} has {size} bytes but the state records {self.state.output_bytes}: "
                "it was changed outside clip-eval; pass --overwrite to start again"
            )
        os.truncate(self.path, self.state.output_bytes)

    def append(
        self, rows: pd.DataFrame, input_rows: int, embeddings: pa.Table | None = None
    ) -> None:
        """Write scored rows (all models of ``input_rows`` input rows) and their embeddings,
        then record them."""
        if self.embeddings is not None and embeddings is not None and embeddings.num_rows:
            self.embeddings.parts.write(self.state.embedding_parts, embeddings)
            self.state.embedding_parts += 1
        if self.format == "parquet":
            self.parts.write(self.state.parts, pa.Table.from_pandas(rows, preserve_index=False))
            self.state.parts += 1
        else:
            with self.path.open("a", encoding="utf-8", newline="") as handle:
                if self.format == "csv":
                    rows.to_csv(handle, index=False, header=self.state.output_bytes == 0)
                else:
                    # 15 digits: pandas' default of 10 would round scores.
                    text = rows.to_json(
                        orient="records", lines=True, force_ascii=False, double_precision=15
                    )
                    handle.write(text if not text or text.endswith("\n") else text + "\n")
            self.state.output_bytes = self.path.stat().st_size
        self.state.rows_done += input_rows
        self.state.save(state_path(self.path))

    def finish(self) -> None:
        """Parquet: merge the parts into ``OUTPUT``. Then mark the run complete."""
        if self.format == "parquet" and not self.state.complete:
            _merge_parts(self.parts.files(), self.path)
        if self.embeddings is not None and not self.state.complete:
            self.embeddings.finish()
        self.state.complete = True
        self.state.save(state_path(self.path))
        if self.format == "parquet":
            shutil.rmtree(parts_path(self.path), ignore_errors=True)


def _merge_parts(files: list[Path], output: Path) -> None:
    if not files:
        raise ClipEvalError(f"no rows were written for {output}")
    # A column that is entirely null in one part has Arrow type null there: unify the types.
    schema = pa.unify_schemas(
        [pq.read_schema(file) for file in files], promote_options="permissive"
    )
    temporary = output.with_name(output.name + ".tmp")
    with pq.ParquetWriter(temporary, schema) as writer:
        for file in files:
            writer.write_table(pq.read_table(file).cast(schema))
    os.replace(temporary, output)


def read_results(path: Path, fmt: TableFormat) -> pd.DataFrame:
    """The ``model``, ``score``, ``cosine`` and ``error`` columns of a finished output (for the
    summary and the plot)."""
    columns = ["model", "score", "cosine", "error"]
    if fmt == "parquet":
        return pd.read_parquet(path, columns=columns)
    if fmt == "csv":
        return pd.read_csv(path, usecols=columns, dtype={"model": str, "error": str})
    with pd.read_json(path, lines=True, chunksize=65536, dtype=False) as reader:
        frames = [chunk.reindex(columns=columns) for chunk in reader]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
