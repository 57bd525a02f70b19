"""clip-eval's optional scores on the tiny model, against open_clip on the same weights:
RefCLIPScore (--reference-column), image-image and text-text similarity (--image-column-2,
--text-column-2), and the embeddings beside the scores (--embeddings-out), all in one run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_eval import cli
from clip_eval.embeddings import EmbeddingsFile, embeddings_format, embeddings_table
from clip_eval.records import PairOutcome
from clip_runtime.errors import EmptyTextError
from clip_runtime.scoring import clip_score, ref_clip_score
from tests.cli_helpers import (
    OPTIONAL_SCORES,
    OTHER_TEXTS,
    add_second_columns,
    read_table,
    reference_features,
)


def test_reference_similarity_and_embeddings_match_open_clip(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    dataset, good = add_second_columns(tmp_path / "data")
    output, vectors = tmp_path / "scores.csv", tmp_path / "vectors.npz"
    args = [
        str(dataset.path),
        "-o",
        str(output),
        "--batch-size",
        "4",
        *OPTIONAL_SCORES,
        "--embeddings-out",
        str(vectors),
        "--model",
        "tiny",
        "--model-dir",
        str(tiny_model_dir),
        "--quiet",
    ]
    assert cli.main(args) == 0
    frame = read_table(output)
    frame["id"] = frame["id"].astype(int)
    rows = frame.set_index("id").loc[good]
    images = [dataset.images[i] for i in good]
    seconds = [dataset.images[(i + 1) % 6] for i in good]
    captions = [dataset.frame.loc[i, "caption"] for i in good]
    references = [
        json.loads(frame.set_index("id").loc[i, "refs"]) if i % 2 else [f"ref {i}"] for i in good
    ]
    flat = [text for refs in references for text in refs]
    image_vectors, text_vectors = reference_features(
        tiny_model_dir, images + seconds, captions + [OTHER_TEXTS[i % 6] for i in good] + flat
    )
    n = len(good)
    image, image_2 = image_vectors[:n], image_vectors[n:]
    caption, text_2, reference = text_vectors[:n], text_vectors[n : 2 * n], text_vectors[2 * n :]
    cosine = (image * caption).sum(-1)
    expected_ref, start = [], 0
    for row, refs in enumerate(references):
        similarities = reference[start : start + len(refs)] @ caption[row]
        expected_ref.append(ref_clip_score(float(cosine[row]), similarities.tolist()))
        start += len(refs)
    np.testing.assert_allclose(rows["ref_clip_score"].astype(float), expected_ref, atol=1e-4)
    image_cosine = (image * image_2).sum(-1)
    np.testing.assert_allclose(rows["image_image_cosine"].astype(float), image_cosine, atol=1e-5)
    np.testing.assert_allclose(
        rows["image_image_score"].astype(float), [clip_score(c) for c in image_cosine], atol=1e-3
    )
    text_cosine = (caption * text_2).sum(-1)
    np.testing.assert_allclose(rows["text_text_cosine"].astype(float), text_cosine, atol=1e-5)
    np.testing.assert_allclose(
        rows["text_text_score"].astype(float), [clip_score(c) for c in text_cosine], atol=1e-3
    )
    failed = frame[frame["error"].notna()]
    assert failed["ref_clip_score"].isna().all() and failed["image_image_cosine"].isna().all()

    saved = np.load(vectors)
    assert list(saved["tiny/row"]) == good  # row ids: 0-based input rows, failed rows absent
    np.testing.assert_allclose(saved["tiny/image"], image, atol=1e-5)
    np.testing.assert_allclose(saved["tiny/text"], caption, atol=1e-5)
    assert not vectors.with_name("vectors.npz.parts").exists()

    # --resume refuses other optional settings than the run was started with.
    without_embeddings = [a for a in args if a not in ("--embeddings-out", str(vectors))]
    assert cli.main([*without_embeddings, "--resume"]) == 2


@pytest.mark.parametrize("suffix", ["parquet", "npy"])
def test_embeddings_formats(tmp_path: Path, suffix: str) -> None:
    """Parts written as rows are scored, a part after the last recorded one dropped on resume,
    merged into Parquet (row, model, vectors) or a structured .npy."""
    vector = np.arange(4, dtype=np.float32)
    outcomes = [
        PairOutcome.scored("m", 0.5, image_vector=vector, text_vector=vector + 1),
        PairOutcome.failed("m", EmptyTextError("text is empty")),
        PairOutcome.scored("m", 0.2, image_vector=vector * 2, text_vector=vector),
    ]
    path = tmp_path / f"e.{suffix}"
    target = EmbeddingsFile(path, embeddings_format(path, models=1))
    target.parts.write(0, embeddings_table(10, outcomes, 1))
    target.parts.write(1, embeddings_table(13, outcomes[:1], 1))  # not recorded: cut back
    target.parts.cut_back(1)
    target.finish()
    if suffix == "parquet":
        table = pq.read_table(target.path)
        assert table.column("row").to_pylist() == [10, 12]
        assert table.column("model").to_pylist() == ["m", "m"]
        np.testing.assert_array_equal(
            np.stack(table.column("image_embedding").to_pylist())[1], vector * 2
        )
    else:
        array = np.load(target.path)
        assert list(array["row"]) == [10, 12]
        np.testing.assert_array_equal(array["text"][0], vector + 1)
