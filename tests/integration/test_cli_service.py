"""clip-eval against the running service (random-init models saved by the project's script):
the remote engine scores exactly as the local engine and open_clip do, a batch over the
service's item limit is split, whole-request refusals stop the run, and --compare-modes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clip_eval import cli
from tests.cli_helpers import (
    CAPTIONS,
    OPTIONAL_SCORES,
    add_second_columns,
    check_output,
    cli_command,
    cli_env,
    make_dataset,
    read_table,
    reference_cosines,
    write_table,
)
from tests.integration.conftest import SERVER_ENV
from tests.integration.server import ServerProcess, model_folder

pytestmark = pytest.mark.integration

B32 = "clip-vit-b-32"


def test_remote_scores_equal_local_scores(
    server: ServerProcess, bentoml_home: Path, tmp_path: Path
) -> None:
    """Scores, RefCLIPScore, image-image and text-text similarity and the embeddings: the remote
    engine (batch and embeddings endpoints) and the local engine give the same numbers."""
    dataset, good = add_second_columns(tmp_path / "data", "jsonl")
    optional = OPTIONAL_SCORES
    remote = tmp_path / "remote.csv"
    code = cli.main(
        [
            str(dataset.path),
            "-o",
            str(remote),
            "--engine",
            "remote",
            "--url",
            server.url,
            "--model",
            "ViT-B-32",
            "--batch-size",
            "4",
            "--concurrency",
            "3",
            *optional,
            "--embeddings-out",
            str(tmp_path / "remote.npz"),
            "--quiet",
        ]
    )
    assert code == 0
    # The local engine as a user runs it: the console script, the model from BENTOML_HOME.
    local = tmp_path / "local.csv"
    result = subprocess.run(
        cli_command(
            str(dataset.path),
            "-o",
            str(local),
            "--model",
            "ViT-B-32",
            *optional,
            "--embeddings-out",
            str(tmp_path / "local.npz"),
            "--quiet",
        ),
        env=cli_env(BENTOML_HOME=str(bentoml_home)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    folder = model_folder(bentoml_home, B32)
    # Both right (open_clip on the same weights), hence equal to each other.
    check_output(remote, dataset, folder, model="ViT-B-32", atol=1e-5)
    check_output(local, dataset, folder, model="ViT-B-32", atol=1e-5)
    remote_rows, local_rows = read_table(remote), read_table(local)
    assert list(remote_rows["error"]) == list(local_rows["error"])
    scored = remote_rows["cosine"].notna()
    assert scored.sum() == len(good)
    for column, atol in [
        ("cosine", 1e-5),
        ("score", 1e-3),
        ("ref_clip_score", 1e-4),
        ("image_image_cosine", 1e-5),
        ("text_text_cosine", 1e-5),
    ]:
        np.testing.assert_allclose(
            remote_rows.loc[scored, column].astype(float),
            local_rows.loc[scored, column].astype(float),
            atol=atol,
            err_msg=column,
        )
    remote_vectors, local_vectors = (
        np.load(tmp_path / "remote.npz"),
        np.load(tmp_path / "local.npz"),
    )
    assert list(remote_vectors["ViT-B-32/row"]) == list(local_vectors["ViT-B-32/row"]) == good
    for name in ("ViT-B-32/image", "ViT-B-32/text"):
        np.testing.assert_allclose(remote_vectors[name], local_vectors[name], atol=1e-5)


def test_remote_splits_batches_over_the_service_limit(
    server: ServerProcess, bentoml_home: Path, tmp_path: Path
) -> None:
    limit = int(SERVER_ENV["CLIP_MAX_BATCH_ITEMS"])
    source = make_dataset(tmp_path / "data")
    good = sorted(source.images)[: len(CAPTIONS)]
    rows = [source.frame.loc[good[i % len(good)]].to_dict() for i in range(limit + 2)]
    frame = pd.DataFrame(rows).assign(id=range(limit + 2))
    write_table(frame, tmp_path / "data" / "many.csv")
    output = tmp_path / "many.parquet"
    code = cli.main(
        [
            str(tmp_path / "data" / "many.csv"),
            "-o",
            str(output),
            "--engine",
            "remote",
            "--url",
            server.url,
            "--batch-size",
            str(limit + 2),  # one request over the limit: answered 413, then sent in halves
            "--quiet",
        ]
    )
    assert code == 0
    scores = read_table(output)
    assert scores["error"].isna().all() and len(scores) == limit + 2
    expected = reference_cosines(
        model_folder(bentoml_home, B32),
        [source.images[i] for i in good],
        [source.frame.loc[i, "caption"] for i in good],
    )
    np.testing.assert_allclose(
        scores["cosine"].astype(float),
        [expected[i % len(good)] for i in range(limit + 2)],
        atol=1e-5,
    )


def test_a_refused_request_stops_the_run_with_the_reason(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "data")
    args = [str(dataset.path), "-o", str(tmp_path / "s.csv"), "--engine", "remote"]
    assert cli.main([*args, "--url", server.url, "--model", "ViT-H-14", "--quiet"]) == 1
    assert "refused a batch: HTTP 422 unknown_model" in capsys.readouterr().err


def test_compare_modes_prints_the_speedup(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "data")
    code = cli.main(
        [
            str(dataset.path),
            "--compare-modes",
            "--url",
            server.url,
            "--compare-pairs",
            "8",
            "--batch-size",
            "4",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    # The first 8 rows are loadable: 8 single requests against 2 batches of 4.
    assert "single: 8 requests" in printed and "batch:  2 requests" in printed, printed
    speedup = float(re.search(r"speedup: ([0-9.]+)x", printed).group(1))
    difference = float(re.search(r"max score difference (\S+)", printed).group(1))
    assert speedup > 0 and difference < 1e-3  # same pairs, same scores, either way
