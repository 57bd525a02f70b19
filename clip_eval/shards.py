"""Dataset layouts beyond single tables: WebDataset tar shards and Hugging Face ``datasets``
folders, read in order as pandas frames so every engine and the writer see the same rows.

- WebDataset: a ``.tar`` (or a folder of them, in name order) whose members are grouped by key,
  ``KEY.jpg`` (or png, jpeg, webp) with ``KEY.txt`` and/or ``KEY.json``. Rows: ``key``, ``image``
  (the encoded bytes), ``caption`` (the ``.txt``, else the json's ``caption`` or ``text``) and
  ``json`` (the raw json text, or None).
- Hugging Face: a folder written by ``datasets.Dataset.save_to_disk``: its ``state.json`` lists
  Arrow stream files, read with pyarrow (no ``datasets`` install needed). ``Image`` features arrive
  as ``{"bytes", "path"}`` structs, which the image reader takes as they are.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from clip_eval.cli_errors import UsageError

WEBDATASET_COLUMNS = ["key", "image", "caption", "json"]
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
HF_STATE_FILE = "state.json"


def is_webdataset(path: Path) -> bool:
    if path.is_dir():
        return any(path.glob("*.tar"))
    return path.suffix.lower() == ".tar"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / HF_STATE_FILE).is_file()


def _shards(path: Path) -> list[Path]:
    shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
    if not shards:
        raise UsageError(f"{path} holds no .tar shards")
    return shards


def _sample_row(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    image = next((members[s] for s in IMAGE_SUFFIXES if s in members), None)
    raw_json = members["json"].decode("utf-8") if "json" in members else None
    caption: Any = members["txt"].decode("utf-8") if "txt" in members else None
    if caption is None and raw_json is not None:
        fields = json.loads(raw_json)
        caption = fields.get("caption", fields.get("text")) if isinstance(fields, dict) else None
    return {"key": key, "image": image, "caption": caption, "json": raw_json}


def iter_webdataset_rows(path: Path) -> Iterator[dict[str, Any]]:
    """One row per sample, in shard and member order (WebDataset stores a sample contiguously;
    its key is the member's name up to the first dot of the file name)."""
    for shard in _shards(path):
        with tarfile.open(shard, "r") as archive:
            key: str | None = None
            members: dict[str, bytes] = {}
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, suffix = base.partition(".")
                sample = f"{folder}/{stem}" if folder else stem
                if key is not None and sample != key:
                    yield _sample_row(key, members)
                    members = {}
                key = sample
                handle = archive.extractfile(member)
                members[suffix.lower()] = handle.read() if handle is not None else b""
            if key is not None:
                yield _sample_row(key, members)


def webdataset_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    batch: list[dict[str, Any]] = []
    for row in iter_webdataset_rows(path):
        batch.append(row)
        if len(batch) == rows:
            yield pd.DataFrame(batch, columns=WEBDATASET_COLUMNS)
            batch = []
    if batch:
        yield pd.DataFrame(batch, columns=WEBDATASET_COLUMNS)


def _arrow_files(path: Path) -> list[Path]:
    state = json.loads((path / HF_STATE_FILE).read_text())
    files = [path / item["filename"] for item in state.get("_data_files", [])]
    if not files:
        raise UsageError(f"{path / HF_STATE_FILE} lists no data files")
    return files


def hf_columns(path: Path) -> list[str]:
    import pyarrow as pa

    with pa.memory_map(str(_arrow_files(path)[0])) as source:
        return list(pa.ipc.open_stream(source).schema.names)


def hf_chunks(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    import pyarrow as pa

    for file in _arrow_files(path):
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        for batch in table.to_batches(max_chunksize=rows):
            yield batch.to_pandas()
