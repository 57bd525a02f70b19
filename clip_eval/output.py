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

from clip_eval.datasets import TableFormat
from clip_eval.errors import ClipEvalError, UsageError

STATE_SUFFIX = ".clip-eval.json"
PARTS_SUFFIX = ".parts"
STATE_VERSION = 1


@dataclass
class RunState:
    fingerprint: dict[str, Any]
    rows_done: int = 0
    output_bytes: int = 0  # CSV/JSONL: the file's length after the last complete append
    parts: int = 0  # Parquet: complete part files
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

    @classmethod
    def open(
        cls,
        path: Path,
        fmt: TableFormat,
        fingerprint: dict[str, Any],
        *,
        resume: bool,
        overwrite: bool,
    ) -> OutputFile:
        """A fresh output, or the interrupted one to continue (``resume``)."""
        state_file = state_path(path)
        exists = path.exists() or state_file.exists() or parts_path(path).exists()
        if exists and overwrite:
            path.unlink(missing_ok=True)
            state_file.unlink(missing_ok=True)
            shutil.rmtree(parts_path(path), ignore_errors=True)
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
            return cls(path, fmt, state)
        if not state_file.exists():
            raise UsageError(
                f"{path} exists but {state_file.name} does not, so what it holds is unknown; "
                "pass --overwrite to start again"
            )
        state = RunState.load(state_file)
        changed = {
            key: (state.fingerprint.get(key), value)
            for key, value in fingerprint.items()
            if state.fingerprint.get(key) != value
        }
        if changed:
            details = "; ".join(
                f"{key}: was {old!r}, now {new!r}" for key, (old, new) in changed.items()
            )
            raise UsageError(
                f"cannot resume {path}: the run was started with other settings ({details}); "
                "rerun with the same ones, or pass --overwrite to start again"
            )
        output = cls(path, fmt, state)
        output._cut_back()
        return output

    @property
    def rows_done(self) -> int:
        return self.state.rows_done

    def _cut_back(self) -> None:
        """Drop whatever was written after the last state update (an interrupted append)."""
        if self.state.complete:
            return
        if self.format == "parquet":
            parts = parts_path(self.path)
            for part in parts.glob("part-*") if parts.is_dir() else []:
                if not part.name.endswith(".parquet") or _part_index(part) >= self.state.parts:
                    part.unlink()
            return
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self.state.output_bytes:
            raise ClipEvalError(
                f"{self.path} has {size} bytes but the state records {self.state.output_bytes}: "
                "it was changed outside clip-eval; pass --overwrite to start again"
            )
        os.truncate(self.path, self.state.output_bytes)

    def append(self, rows: pd.DataFrame, input_rows: int) -> None:
        """Write scored rows (all models of ``input_rows`` input rows), then record them."""
        if self.format == "parquet":
            parts = parts_path(self.path)
            parts.mkdir(exist_ok=True)
            final = parts / f"part-{self.state.parts:06d}.parquet"
            temporary = final.with_suffix(".tmp")
            rows.to_parquet(temporary, index=False)
            os.replace(temporary, final)
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
            _merge_parts(parts_path(self.path), self.path)
        self.state.complete = True
        self.state.save(state_path(self.path))
        if self.format == "parquet":
            shutil.rmtree(parts_path(self.path), ignore_errors=True)


def _part_index(part: Path) -> int:
    try:
        return int(part.name.removeprefix("part-").removesuffix(".parquet"))
    except ValueError:
        return 1 << 62


def _merge_parts(parts: Path, output: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(parts.glob("part-*.parquet"), key=_part_index)
    if not files:
        raise ClipEvalError(f"no rows were written to {parts}")
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
    """The ``model``, ``score`` and ``error`` columns of a finished output (for the summary)."""
    columns = ["model", "score", "error"]
    if fmt == "parquet":
        return pd.read_parquet(path, columns=columns)
    if fmt == "csv":
        return pd.read_csv(path, usecols=columns, dtype={"model": str, "error": str})
    with pd.read_json(path, lines=True, chunksize=65536, dtype=False) as reader:
        frames = [chunk.reindex(columns=columns) for chunk in reader]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
