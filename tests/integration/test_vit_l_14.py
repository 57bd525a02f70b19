"""The one ViT-L-14 smoke test: a server with both models, each request scored by the model it
names, the large model's scores (its own preprocessing, mean/std 0.5) equal to open_clip's on the
same weights. Everything else runs on ViT-B-32 or the tiny config: ViT-L-14 is slow on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from clip_testkit.reference import reference_cosines
from clip_testkit.routes import BATCH, EMBED_TEXT, HEALTH, SINGLE
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ServerProcess, model_folder

pytestmark = pytest.mark.integration

CAPTIONS = ["a photo of a cat", "a red bus in the rain"]


@pytest.fixture(scope="module")
def both_models(l14_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    env = {"CLIP_MODELS": "ViT-B-32,ViT-L-14"}
    process = ServerProcess(l14_home, tmp_path_factory.mktemp("l14") / "serve.log", env)
    process.start()
    with httpx.Client(base_url=process.url, timeout=300) as http:
        yield http
    process.stop()


def test_vit_l_14_scores_match_open_clip_next_to_vit_b_32(
    both_models: httpx.Client, l14_home: Path
) -> None:
    images = [jpeg_bytes(seed, 320, 240) for seed in range(2)]
    health = both_models.get(HEALTH).json()
    assert health["default_model"] == "ViT-B-32"
    assert {m["name"]: m["untrained"] for m in health["models"]} == {
        "ViT-B-32": True,
        "ViT-L-14": True,
    }

    expected = reference_cosines(model_folder(l14_home, "clip-vit-l-14"), images, CAPTIONS)
    single = both_models.post(
        SINGLE, json={"image": b64(images[0]), "text": CAPTIONS[0], "model": "ViT-L-14"}
    )
    assert single.status_code == 200, single.text
    assert single.json()["model"] == "ViT-L-14" and single.json()["weights"] == "random-init"
    assert single.json()["cosine"] == pytest.approx(expected[0], abs=2e-6)
    batch = both_models.post(
        BATCH,
        json={
            "model": "ViT-L-14",
            "items": [{"image": b64(d), "text": t} for d, t in zip(images, CAPTIONS, strict=True)],
        },
    )
    assert batch.status_code == 200, batch.text
    np.testing.assert_allclose([r["cosine"] for r in batch.json()["results"]], expected, atol=2e-6)
    text = both_models.post(EMBED_TEXT, json={"texts": ["x"], "model": "ViT-L-14"}).json()
    assert text["dim"] == 768

    # No model named: the default, ViT-B-32, on its own weights.
    b32 = reference_cosines(model_folder(l14_home, "clip-vit-b-32"), images[:1], CAPTIONS[:1])
    default = both_models.post(SINGLE, json={"image": b64(images[0]), "text": CAPTIONS[0]}).json()
    assert default["model"] == "ViT-B-32"
    assert default["cosine"] == pytest.approx(b32[0], abs=2e-6)
    unknown = both_models.post(SINGLE, json={"image": "AAAA", "text": "x", "model": "RN50"})
    assert "ViT-B-32" in unknown.json()["error"]["message"]
    assert "ViT-L-14" in unknown.json()["error"]["message"]
