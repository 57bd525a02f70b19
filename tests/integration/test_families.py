"""Any registered model through `bentoml serve`: a tiny CLIP and a tiny SigLIP architecture,
saved with random weights by the project's own script (``--config``, ``--tokenizer``) and served
together by ONE server, checked against open_clip's own computation on the same weights.

The server never registers the tiny configs with open_clip (``add_model_config``): each store
entry is an open_clip ``local-dir:`` with its own ``open_clip_config.json`` (and, for SigLIP, its
tokenizer files), so what the script saved is all `serve` needs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import open_clip
import pytest
import torch
from PIL import Image

from clip_runtime.registry import store_name
from clip_runtime.tokens import token_count
from clip_testkit.reference import reference_cosines
from clip_testkit.sample_images import b64, jpeg_bytes
from clip_testkit.server import ServerProcess, model_folder, save_random_init_models
from tests.conftest import FIXTURES, SIGLIP_TINY, TINY, write_offline_tokenizer

pytestmark = pytest.mark.integration

FAMILIES = {TINY: "clip", SIGLIP_TINY: "siglip"}
CAPTIONS = ["a photo of a cat", "a diagram of a bridge", "two dogs on a beach at sunset"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """This module's one server (the `client` fixture talks to it): both tiny models."""
    root = tmp_path_factory.mktemp("families")
    home = root / "home"
    tokenizer = write_offline_tokenizer(root / "tokenizer")
    save_random_init_models(home, [TINY], options=["--config", str(FIXTURES / f"{TINY}.json")])
    save_random_init_models(
        home,
        [SIGLIP_TINY],
        options=["--config", str(FIXTURES / f"{SIGLIP_TINY}.json"), "--tokenizer", str(tokenizer)],
    )
    server = ServerProcess(home, root / "serve.log", {"CLIP_MODELS": ",".join(FAMILIES)})
    server.start()
    yield server
    server.stop()


def folder_of(server: ServerProcess, name: str) -> Path:
    """The store entry the server reads for ``name`` (its home links to the saved models)."""
    return model_folder(server.home, store_name(name))


def open_clip_reference(folder: Path, image: bytes, texts: list[str]) -> dict[str, Any]:
    """open_clip's own forward pass on the saved entry: cosines, and rank probabilities the
    family's way (CLIP: softmax of logit_scale * cos; SigLIP: sigmoid with logit_bias)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        pixels = preprocess(Image.open(io.BytesIO(image))).unsqueeze(0)
        image_vector = model.encode_image(pixels, normalize=True)
        text_vectors = model.encode_text(tokenizer(texts), normalize=True)
        cosines = (image_vector @ text_vectors.T)[0]
        logits = model.logit_scale.exp() * cosines
        if model.logit_bias is not None:
            probabilities = torch.sigmoid(logits + model.logit_bias)
        else:
            probabilities = logits.softmax(dim=-1)
        logit_scale = float(model.logit_scale.exp())
    return {"cosines": cosines, "probabilities": probabilities, "logit_scale": logit_scale}


def test_health_lists_both_models_with_their_family(client: httpx.Client) -> None:
    response = client.get("/evaluator/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["default_model"] == TINY  # the first served one
    by_name = {model["name"]: model for model in body["models"]}
    assert {name: model["family"] for name, model in by_name.items()} == FAMILIES
    for name, model in by_name.items():
        assert model["architecture"] == name and model["ready"] is True
        assert model["weights"] == "random-init" and model["untrained"] is True


def test_api_docs_list_the_served_models(client: httpx.Client) -> None:
    spec = client.get("/docs.json").json()
    model_fields = [
        schema["properties"]["model"]
        for schema in spec["components"]["schemas"].values()
        if "model" in schema.get("properties", {}) and "examples" in schema["properties"]["model"]
    ]
    assert len(model_fields) >= 6  # single, upload, batch, rank, image and text embeddings
    for field in model_fields:
        assert field["examples"] == list(FAMILIES)
        assert all(f"`{name}`" in field["description"] for name in FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_single_matches_open_clip(client: httpx.Client, server: ServerProcess, name: str) -> None:
    image = jpeg_bytes(5, 96, 80)
    response = client.post(
        "/evaluator/v1/evaluation/single",
        json={"image": b64(image), "text": CAPTIONS[0], "model": name},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    (expected,) = reference_cosines(folder_of(server, name), [image], CAPTIONS[:1])
    assert body["cosine"] == pytest.approx(expected, abs=2e-5)
    assert body["score"] == pytest.approx(100 * max(body["cosine"], 0.0))
    assert (body["model"], body["weights"], body["text_truncated"]) == (name, "random-init", False)


@pytest.mark.parametrize("name", FAMILIES)
def test_rank_probabilities_follow_the_family(
    client: httpx.Client, server: ServerProcess, name: str
) -> None:
    image = jpeg_bytes(6, 80, 96)
    response = client.post(
        "/evaluator/v1/evaluation/rank",
        json={"image": b64(image), "texts": CAPTIONS, "model": name},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    reference = open_clip_reference(folder_of(server, name), image, CAPTIONS)
    results = sorted(body["results"], key=lambda result: result["index"])
    cosines = [result["cosine"] for result in results]
    probabilities = [result["probability"] for result in results]
    assert cosines == pytest.approx(reference["cosines"].tolist(), abs=2e-5)
    assert probabilities == pytest.approx(reference["probabilities"].tolist(), rel=1e-3, abs=1e-7)
    assert body["logit_scale"] == pytest.approx(reference["logit_scale"], rel=1e-5)
    if FAMILIES[name] == "clip":
        assert sum(probabilities) == pytest.approx(1.0)
    else:  # one independent sigmoid per candidate, not a distribution over them
        assert sum(probabilities) != pytest.approx(1.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_truncation_flag_uses_the_models_own_tokenizer(
    client: httpx.Client, server: ServerProcess, name: str
) -> None:
    """Exactly the context fits and one more word is flagged, counted with each model's own
    tokenizer (CLIP BPE: 77 tokens; the SigLIP stand-in: 64), so the same 70-word caption is
    truncated for SigLIP only."""
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder_of(server, name)}")
    context = tokenizer.context_length
    assert context == {"clip": 77, "siglip": 64}[FAMILIES[name]]
    fitting = " ".join(["cat"] * (context - token_count(tokenizer, "")))
    seventy = " ".join(["cat"] * 70)
    texts = [fitting, fitting + " dog", seventy]
    response = client.post("/evaluator/v1/embeddings/text", json={"texts": texts, "model": name})
    assert response.status_code == 200, response.text
    assert response.json()["text_truncated"] == [False, True, FAMILIES[name] == "siglip"]
    single = client.post(
        "/evaluator/v1/evaluation/single",
        json={"image": b64(jpeg_bytes(7, 64, 64)), "text": fitting + " dog", "model": name},
    )
    assert single.status_code == 200 and single.json()["text_truncated"] is True
