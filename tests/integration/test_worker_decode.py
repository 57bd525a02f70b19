"""The service with the model worker decoding JPEGs (CLIP_GPU_DECODE=on runs the same torch code on
CPU) and two HTTP workers: forwarded JPEGs and the formats that fall back to the front end's crop,
per image in one batch, all score like open_clip's own pipeline."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps

from clip_runtime.model_entry import store_name
from clip_testkit.reference import reference_cosines
from clip_testkit.sample_images import b64, encode, jpeg_bytes, photo_like
from clip_testkit.server import ServerProcess, model_folder

pytestmark = pytest.mark.integration

BATCH = "/evaluator/v1/evaluation/batch"
# fp32 on CPU: the tensor path is 2.9e-6 from the PIL path on these images (test_tensor_decode).
COSINE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def decoding_server(
    bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = ServerProcess(
        bentoml_home,
        tmp_path_factory.mktemp("worker-decode") / "serve.log",
        {"CLIP_MODELS": "ViT-B-32", "CLIP_GPU_DECODE": "on", "CLIP_HTTP_WORKERS": "2"},
    )
    process.start()
    yield process
    process.stop()


def test_forwarded_jpegs_and_per_image_fallbacks_score_like_open_clip(
    decoding_server: ServerProcess, bentoml_home: Path
) -> None:
    image = photo_like(5, 160, 120)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: nvjpeg would not apply it, so the front end crops it
    images = [
        jpeg_bytes(1),  # forwarded
        encode(image, "PNG"),  # front-end crop
        jpeg_bytes(2, 300, 500),  # forwarded
        encode(image, "JPEG", exif=exif.tobytes()),  # front-end crop
        encode(image.convert("CMYK"), "JPEG"),  # front-end crop
        encode(image.convert("L"), "JPEG"),  # forwarded (greyscale)
    ]
    texts = [f"a photo of thing {i}" for i in range(len(images))]
    texts[2] = "word " * 100  # cut to the context by the front end's tokenizer
    items = [{"image": b64(data), "text": text} for data, text in zip(images, texts, strict=True)]
    items.append({"image": b64(b"\xff\xd8\xff\xe0 not a jpeg"), "text": "broken"})
    with httpx.Client(base_url=decoding_server.url, timeout=300) as client:
        health = client.get("/evaluator/health").json()
        response = client.post(BATCH, json={"items": items, "model": "ViT-B-32"})
    assert response.status_code == 200, response.text
    assert health["models"][0]["device"] == "cpu"
    results = response.json()["results"]
    assert results[-1]["error"]["code"] == "invalid_image"
    # open_clip's pipeline ignores EXIF; the service turns the image upright first: give the
    # reference the upright pixels, losslessly.
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(images[3])))
    reference_images = [*images[:3], encode(upright, "PNG"), *images[4:]]
    folder = model_folder(bentoml_home, store_name("ViT-B-32"))
    expected = reference_cosines(folder, reference_images, texts)
    for index, (result, want) in enumerate(zip(results[:-1], expected, strict=True)):
        assert result["error"] is None, index
        assert result["cosine"] == pytest.approx(want, abs=COSINE_TOLERANCE), index
    assert [r["text_truncated"] for r in results[:-1]] == [i == 2 for i in range(len(images))]
