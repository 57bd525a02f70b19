"""clip-eval's Ray engine on a local Ray started here with small resources (2 CPUs, no
dashboard): the Ray Data pipeline scores like open_clip, and continues an interrupted run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray

from clip_eval import cli
from clip_eval.output import OutputFile, state_path
from tests.cli_helpers import OPTIONAL_SCORES, add_second_columns, check_output

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray() -> Iterator[float]:
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield time.perf_counter() - started
    ray.shutdown()


def test_ray_engine_scores_and_resumes(
    local_ray: float, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, good = add_second_columns(tmp_path / "data", "parquet")
    output = tmp_path / "scores.parquet"
    extras = [*OPTIONAL_SCORES, "--embeddings-out", str(tmp_path / "vectors.npz")]
    common = [str(dataset.path), "-o", str(output), "--batch-size", "3", "--quiet", *extras]
    tiny = ["--model", "tiny", "--model-dir", str(tiny_model_dir)]

    # The first 6 rows locally, then an interruption (as Ctrl-C between two batches).
    real_append = OutputFile.append

    def append_then_interrupt(
        self: OutputFile, rows: pd.DataFrame, input_rows: int, embeddings: Any = None
    ) -> None:
        real_append(self, rows, input_rows, embeddings)
        if self.rows_done >= 6:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(OutputFile, "append", append_then_interrupt)
        assert cli.main([*common, *tiny]) == 130
    assert json.loads(state_path(output).read_text())["rows_done"] == 6

    # The rest on Ray: rows 6.. hold every other kind of reference and every bad row. Were a
    # row skipped or scored twice, outcomes would land on the wrong rows and the check fails.
    started = time.perf_counter()
    assert cli.main([*common, *tiny, "--engine", "ray", "--resume"]) == 0
    print(f"ray.init {local_ray:.1f}s, ray run {time.perf_counter() - started:.1f}s")
    check_output(output, dataset, tiny_model_dir)
    assert ray.is_initialized()  # the CLI leaves a Ray it did not start running

    # The optional scores and the embeddings, across the local half and the Ray half, are the
    # local engine's over the whole input.
    local = tmp_path / "local.parquet"
    local_extras = [*OPTIONAL_SCORES, "--embeddings-out", str(tmp_path / "local.npz")]
    assert cli.main([str(dataset.path), "-o", str(local), "--quiet", *local_extras, *tiny]) == 0
    ray_rows, local_rows = pd.read_parquet(output), pd.read_parquet(local)
    for column in ("ref_clip_score", "image_image_cosine", "text_text_cosine"):
        np.testing.assert_allclose(
            ray_rows[column].astype(float), local_rows[column].astype(float), atol=1e-6
        )
    ray_vectors, local_vectors = np.load(tmp_path / "vectors.npz"), np.load(local_extras[-1])
    assert list(ray_vectors["tiny/row"]) == good
    np.testing.assert_allclose(ray_vectors["tiny/image"], local_vectors["tiny/image"], atol=1e-6)
    np.testing.assert_allclose(ray_vectors["tiny/text"], local_vectors["tiny/text"], atol=1e-6)
