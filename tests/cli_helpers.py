"""A small generated dataset of image-caption pairs for the clip-eval tests (nothing fetched)."""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clip_testkit.reference import reference_cosines, reference_model
from clip_testkit.sample_images import encode, jpeg_bytes, photo_like

ROOT = Path(__file__).resolve().parent.parent

CAPTIONS = [
    "a photo of a cat",
    "a red bus in the rain",
    "a bowl of soup",
    "two dogs on a beach at sunset",
    "a photo of a cat",  # repeated text: the text cache must not mix pairs up
    "a diagram of a bridge",
]


@dataclass(frozen=True)
class Dataset:
    path: Path
    frame: pd.DataFrame
    images: dict[int, bytes]  # row id -> the image bytes a good row refers to
    errors: dict[int, str]  # row id -> the error code a bad row must get


def make_dataset(folder: Path, fmt: str = "csv", url: str | None = None) -> Dataset:
    """Rows of every kind of image reference (relative and absolute path, base64, data URI,
    URL when ``url`` serves ``folder``) and of every kind of bad row; ids in column ``id``."""
    images_dir = folder / "img"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    images: dict[int, bytes] = {}
    errors: dict[int, str] = {}

    def add(image: object, caption: str, data: bytes | None = None, error: str | None = None):
        row_id = len(rows)
        rows.append({"id": row_id, "image": image, "caption": caption, "refs": f"ref {row_id}"})
        if data is not None:
            images[row_id] = data
        if error is not None:
            errors[row_id] = error

    for seed, caption in enumerate(CAPTIONS):
        data = jpeg_bytes(seed, 96, 80)
        (images_dir / f"{seed}.jpg").write_bytes(data)
        add(f"img/{seed}.jpg", caption, data)
    add(str((images_dir / "1.jpg").resolve()), "an absolute path", images[1])
    add(base64.b64encode(images[2]).decode(), "plain base64", images[2])
    png = encode(photo_like(7, 70, 90), "PNG")
    add("data:image/png;base64," + base64.b64encode(png).decode(), "a data URI", png)
    (images_dir / "broken.jpg").write_bytes(b"this is not an image")
    add("img/missing.jpg", "no such file", error="image_not_found")
    add("img/0.jpg", "", error="empty_text")
    add("ftp://example.com/a.jpg", "not http", error="url_not_allowed")
    add("http://[::1/a.jpg", "a URL that does not parse", error="invalid_url")
    add("img/broken.jpg", "corrupt", error="invalid_image")
    if url is not None:
        add(f"{url}/img/3.jpg", "fetched over http", images[3])
        add(f"{url}/img/none.jpg", "a 404", error="url_fetch_failed")

    frame = pd.DataFrame(rows)
    path = folder / f"pairs.{fmt}"
    write_table(frame, path)
    return Dataset(path, frame, images, errors)


# The flags that score the columns add_second_columns writes.
OPTIONAL_SCORES = [
    "--reference-column",
    "refs",
    "--image-column-2",
    "image2",
    "--text-column-2",
    "text2",
]
OTHER_TEXTS = ["a kitten asleep", "a bus", "soup in a bowl", "dogs running", "a cat", "a plan"]


def add_second_columns(folder: Path, fmt: str = "csv") -> tuple[Dataset, list[int]]:
    """The CLI test dataset with references (one text, or a JSON list), a second image and a
    second text on every row; the ids of the rows that score."""
    dataset = make_dataset(folder, fmt)
    frame = dataset.frame.copy()
    good = [i for i in frame["id"] if i not in dataset.errors]
    frame["refs"] = [
        json.dumps([f"ref {i}", OTHER_TEXTS[i % 6]]) if i % 2 else f"ref {i}" for i in frame["id"]
    ]
    frame["image2"] = [f"img/{(i + 1) % 6}.jpg" for i in frame["id"]]
    frame["text2"] = [OTHER_TEXTS[i % 6] for i in frame["id"]]
    write_table(frame, dataset.path)
    return Dataset(dataset.path, frame, dataset.images, dataset.errors), good


def write_table(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)


def read_table(path: Path) -> pd.DataFrame:
    """An output table, with missing values as None whatever the format."""
    if path.suffix == ".csv":
        frame = pd.read_csv(path, dtype={"caption": str, "image": str, "error": str})
    elif path.suffix == ".jsonl":
        frame = pd.read_json(path, lines=True, dtype=False)
    else:
        frame = pd.read_parquet(path)
    return frame.astype(object).where(frame.notna(), None)


def reference_features(
    folder: Path, images: list[bytes], texts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """open_clip end to end, its own way (its transform and tokenizer), fp32 on the CPU:
    L2-normalized image and text embeddings."""
    model, preprocess, tokenizer = reference_model(folder)
    with torch.no_grad():
        image_features = torch.zeros((0, 0))
        if images:
            pixels = torch.stack(
                [preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for data in images]
            )
            image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
    return image_features.numpy(), text_features.numpy()


def check_output(
    output: Path, dataset: Dataset, model_dir: Path, model: str = "tiny", atol: float = 2e-6
) -> None:
    """Every input row once, in order, passed through unchanged, with the right result."""
    frame = read_table(output)
    frame["id"] = frame["id"].astype(int)  # CSV input is carried as text, ids included
    assert list(frame["id"]) == list(dataset.frame["id"])
    assert list(frame["caption"].fillna("")) == list(dataset.frame["caption"])
    assert list(frame["refs"]) == list(dataset.frame["refs"])
    assert set(frame["model"]) == {model}
    for row in frame.itertuples():
        if row.id in dataset.errors:
            assert row.error == dataset.errors[row.id], row
            assert row.score is None and row.cosine is None and row.error_message
        else:
            assert row.error is None and row.error_message is None, row
            assert row.score == pytest.approx(100 * max(row.cosine, 0.0))
    good = [row_id for row_id in dataset.frame["id"] if row_id not in dataset.errors]
    expected = reference_cosines(
        model_dir,
        [dataset.images[i] for i in good],
        [dataset.frame.loc[i, "caption"] for i in good],
    )
    actual = frame.set_index("id").loc[good, "cosine"].astype(float)
    np.testing.assert_allclose(actual, expected, atol=atol)


def cli_command(*args: str) -> list[str]:
    """``clip-eval`` as a subprocess of this interpreter (the worktree is on its path)."""
    return [sys.executable, "-m", "clip_eval", *args]


def cli_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def allow_host(url: str) -> list[str]:
    """The flag that lets clip-eval fetch from a test server on loopback (refused otherwise)."""
    return ["--url-allowed-host", url.split("://", 1)[1].split("/", 1)[0]]
