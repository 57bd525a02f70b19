"""Complete Parquet part files in a folder, numbered in write order: how outputs that cannot be
appended to (Parquet, embeddings) are written as rows are scored and merged at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class PartFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def write(self, index: int, table: pa.Table) -> None:
        """``part-INDEX.parquet``, complete or absent (written aside, then renamed)."""
        self.folder.mkdir(exist_ok=True)
        final = self.folder / f"part-{index:06d}.parquet"
        temporary = final.with_suffix(".tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)

    def cut_back(self, parts: int) -> None:
        """Drop whatever was written after the first ``parts`` parts (an interrupted write)."""
        for part in self.folder.glob("part-*") if self.folder.is_dir() else []:
            if not part.name.endswith(".parquet") or _index(part) >= parts:
                part.unlink()

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"), key=_index)


def _index(part: Path) -> int:
    try:
        return int(part.name.removeprefix("part-").removesuffix(".parquet"))
    except ValueError:
        return 1 << 62
