"""scripts/bench_ray.py's pieces that need no cluster: the pairs it makes and the table it
appends (the runs themselves are `make bench-ray`; their figures are printed, never asserted)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scripts import bench_ray as bench


def test_pairs_are_jpeg_files_with_captions(tmp_path: Path) -> None:
    table = pd.read_csv(bench.make_pairs(tmp_path, 3))
    assert list(table["image"]) == ["img/0.jpg", "img/1.jpg", "img/2.jpg"]
    assert all((tmp_path / name).read_bytes()[:2] == b"\xff\xd8" for name in table["image"])
    assert table["caption"].notna().all()


def test_table_compares_every_run_with_the_local_engine() -> None:
    runs = [
        bench.Run("local", [], wall_s=20.0, scoring_s=16.0, matches_local="-"),
        bench.Run(
            "ray, 2 actors",
            [],
            wall_s=30.0,
            scoring_s=20.0,
            per_actor={"a": 144, "b": 144},
            matches_local="yes",
        ),
    ]
    lines = bench.table(runs).splitlines()
    assert lines[2].startswith("| local | 20.0 | 1.00x | 16.0 | 1.00x |")
    assert lines[3] == "| ray, 2 actors | 30.0 | 1.50x | 20.0 | 1.25x | 144, 144 | no | yes |"
