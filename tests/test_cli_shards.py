"""clip-eval reads WebDataset tar shards and Hugging Face ``save_to_disk`` folders, scoring the
same pairs open_clip scores on the same weights, in the input's order."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from clip_eval import cli
from clip_testkit.reference import reference_cosines
from clip_testkit.sample_images import encode, jpeg_bytes, photo_like

CAPTIONS = ["a photo of a cat", "a diagram of a bridge", "two dogs on a beach", "red and green"]


def images() -> list[bytes]:
    return [
        jpeg_bytes(0, 96, 64),
        encode(photo_like(1, 80, 80), "PNG"),
        jpeg_bytes(2, 64, 96),
        jpeg_bytes(3, 70, 70),
    ]


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def score(input_path: Path, output: Path, model_dir: Path) -> pd.DataFrame:
    args = [str(input_path), "-o", str(output), "--batch-size", "3"]
    assert cli.main([*args, "--model", "tiny", "--model-dir", str(model_dir), "--quiet"]) == 0
    return pd.read_parquet(output)


def test_webdataset_shards(tmp_path: Path, tiny_model_dir: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    data = images()
    suffixes = ["jpg", "png", "jpg", "jpg"]
    for shard, samples in (("000000.tar", [0, 1]), ("000001.tar", [2, 3])):
        with tarfile.open(shards / shard, "w") as archive:
            for i in samples:
                key = f"sample{i:04d}"
                add(archive, f"{key}.{suffixes[i]}", data[i])
                if i == 1:  # a caption in the json only
                    add(archive, f"{key}.json", json.dumps({"caption": CAPTIONS[i]}).encode())
                else:
                    add(archive, f"{key}.txt", CAPTIONS[i].encode())
    frame = score(shards, tmp_path / "out.parquet", tiny_model_dir)
    assert list(frame["key"]) == [f"sample{i:04d}" for i in range(4)]
    assert list(frame["caption"]) == CAPTIONS and frame["error"].isna().all()
    expected = reference_cosines(tiny_model_dir, data, CAPTIONS)
    np.testing.assert_allclose(frame["cosine"].astype(float), expected, atol=2e-6)


def test_hugging_face_datasets_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    import datasets

    data = images()
    pil = [Image.open(io.BytesIO(item)) for item in data]
    saved = datasets.Dataset.from_dict(
        {"image": pil, "caption": CAPTIONS, "id": list(range(4))},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.Value("string"),
                "id": datasets.Value("int64"),
            }
        ),
    )
    saved.save_to_disk(str(tmp_path / "hf"))
    frame = score(tmp_path / "hf", tmp_path / "out.parquet", tiny_model_dir)
    assert list(frame["id"]) == [0, 1, 2, 3] and frame["error"].isna().all()
    stored = [
        row["bytes"] for row in saved.cast_column("image", datasets.Image(decode=False))["image"]
    ]
    expected = reference_cosines(tiny_model_dir, stored, CAPTIONS)
    np.testing.assert_allclose(frame["cosine"].astype(float), expected, atol=2e-6)
