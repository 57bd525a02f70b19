"""Ranking, embeddings, reference-based scores, model choice and the demo page, over HTTP."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clip_testkit.reference import reference_model
from clip_testkit.routes import BATCH, EMBED_IMAGE, EMBED_TEXT, RANK, SINGLE
from clip_testkit.sample_images import b64, encode, jpeg_bytes, photo_like
from clip_testkit.server import ServerProcess, model_folder

pytestmark = pytest.mark.integration

CAPTIONS = ["a photo of a cat", "a red bus", "a bowl of soup"]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [jpeg_bytes(seed, 320, 240) for seed in range(10, 13)]


def single_cosine(client: httpx.Client, image: bytes, text: str) -> float:
    response = client.post(SINGLE, json={"image": b64(image), "text": text})
    assert response.status_code == 200, response.text
    return response.json()["cosine"]


def test_rank_texts_for_an_image(
    client: httpx.Client, bentoml_home: Path, images: list[bytes]
) -> None:
    response = client.post(RANK, json={"image": b64(images[0]), "texts": CAPTIONS})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = [single_cosine(client, images[0], text) for text in CAPTIONS]
    got = [r["cosine"] for r in body["results"]]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    model, _, _ = reference_model(model_folder(bentoml_home, "clip-vit-b-32"))
    logit_scale = float(model.logit_scale.detach().exp())
    assert body["logit_scale"] == pytest.approx(logit_scale, rel=1e-6)
    logits = logit_scale * np.array(got)
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose([r["probability"] for r in body["results"]], softmax, atol=1e-6)
    assert body["best"] == int(np.argmax(got)) and body["ranked"] == "texts"
    assert [r["score"] for r in body["results"]] == pytest.approx([100 * max(c, 0) for c in got])


def test_rank_images_for_a_caption(client: httpx.Client, images: list[bytes]) -> None:
    body = client.post(
        RANK, json={"images": [b64(i) for i in images], "text": CAPTIONS[1], "model": "ViT-B-32"}
    ).json()
    expected = [single_cosine(client, image, CAPTIONS[1]) for image in images]
    np.testing.assert_allclose([r["cosine"] for r in body["results"]], expected, atol=1e-5)
    assert body["model"] == "ViT-B-32" and body["ranked"] == "images"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"image": "AAAA", "texts": ["a"], "text": "b"}, 400, "invalid_request"),
        ({"texts": ["a", "b"]}, 400, "invalid_request"),
        ({"image": "AAAA", "texts": []}, 400, "invalid_request"),
        ({"images": [b64(jpeg_bytes(0, 64, 64)), "AAAA"], "text": "a"}, 422, "invalid_image"),
        ({"image": b64(jpeg_bytes(0, 64, 64)), "texts": ["a", ""]}, 422, "empty_text"),
        (
            {"image": b64(jpeg_bytes(0, 64, 64)), "texts": ["a"], "model": "RN50"},
            422,
            "unknown_model",
        ),
    ],
)
def test_rank_errors(client: httpx.Client, payload: dict, status: int, code: str) -> None:
    response = client.post(RANK, json=payload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    if code in ("invalid_image", "empty_text"):
        assert "[1]" in response.json()["error"]["message"]  # which candidate


def test_embeddings_match_open_clip_and_the_scores(
    client: httpx.Client, bentoml_home: Path, images: list[bytes]
) -> None:
    image_body = client.post(EMBED_IMAGE, json={"images": [b64(i) for i in images[:2]]}).json()
    text_body = client.post(EMBED_TEXT, json={"texts": [CAPTIONS[0], "a dog " * 90]}).json()
    assert image_body["dim"] == text_body["dim"] == 512
    vectors = np.array(image_body["embeddings"])
    texts = np.array(text_body["embeddings"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert text_body["text_truncated"] == [False, True]
    folder = model_folder(bentoml_home, "clip-vit-b-32")
    model, preprocess, _ = reference_model(folder)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(d))) for d in images[:2]])
        reference = model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(vectors, reference, atol=2e-6)
    assert float(vectors[0] @ texts[0]) == pytest.approx(
        single_cosine(client, images[0], CAPTIONS[0]), abs=1e-5
    )
    bad = client.post(EMBED_IMAGE, json={"images": ["AAAA"], "model": "nope"})
    assert bad.status_code == 422 and "ViT-B-32" in bad.json()["error"]["message"]


def test_reference_scores_and_the_paper_scale(client: httpx.Client, images: list[bytes]) -> None:
    references = ["a cat on a sofa", "a kitten"]
    plain = client.post(SINGLE, json={"image": b64(images[0]), "text": CAPTIONS[0]}).json()
    assert "clip_s" not in plain and "ref_clip_score" not in plain  # the plain contract
    body = client.post(
        SINGLE,
        json={
            "image": b64(images[0]),
            "text": CAPTIONS[0],
            "references": references,
            "scale": "paper",
        },
    ).json()
    cosine = body["cosine"]
    assert cosine == pytest.approx(plain["cosine"], abs=1e-6)
    assert body["clip_s"] == pytest.approx(2.5 * max(cosine, 0))
    vectors = np.array(
        client.post(EMBED_TEXT, json={"texts": [CAPTIONS[0], *references]}).json()["embeddings"]
    )
    best_reference = max(float(vectors[0] @ v) for v in vectors[1:])
    clip_s, ref = 2.5 * max(cosine, 0), max(best_reference, 0)
    expected = 0.0 if clip_s + ref == 0 else 2 * clip_s * ref / (clip_s + ref)
    assert body["ref_clip_score"] == pytest.approx(expected, abs=1e-5)

    batch = client.post(
        BATCH,
        json={
            "items": [
                {"image": b64(images[0]), "text": CAPTIONS[0], "references": references},
                {"image": b64(images[1]), "text": CAPTIONS[1]},
                {"image": b64(images[1]), "text": CAPTIONS[1], "references": [""]},
            ]
        },
    ).json()
    first, second, third = batch["results"]
    assert first["ref_clip_score"] == pytest.approx(body["ref_clip_score"], abs=1e-5)
    assert "ref_clip_score" not in second
    assert third["error"]["code"] == "empty_text"


def test_demo_page_renders_the_api_scores(server: ServerProcess, tmp_path: Path) -> None:
    """Headless Chromium: upload a generated image, enter captions, read the rendered scores."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser_path, "Debian's chromium is required (apt-get install chromium)"
    image_path = tmp_path / "picture.png"
    image_path.write_bytes(encode(photo_like(21, 200, 150), "PNG"))
    captions = ["a striped pattern", "a photo of a boat", "green leaves"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{server.url}/evaluator/demo")
        page.wait_for_selector("#model option", state="attached")
        assert page.is_visible("#untrained")  # random-init weights are flagged
        assert "untrained" in page.inner_text("#untrained")
        page.set_input_files("#image", str(image_path))
        page.wait_for_function("document.getElementById('preview').src.startsWith('data:')")
        page.fill("#captions", "\n".join(captions))
        page.click("#score")
        page.wait_for_selector("body[data-state=scored]", timeout=120_000)
        rows = page.query_selector_all(".result:not(.head)")
        rendered = [float(row.get_attribute("data-score")) for row in rows]
        cosines = [float(row.query_selector(".cosine").inner_text()) for row in rows]
        shown = [row.query_selector(".caption").inner_text() for row in rows]
        browser.close()
    assert shown == captions
    with httpx.Client(base_url=server.url, timeout=300) as client:
        answers = [
            client.post(SINGLE, json={"image": b64(image_path.read_bytes()), "text": c}).json()
            for c in captions
        ]
    np.testing.assert_allclose(rendered, [a["score"] for a in answers], atol=1e-3)
    # The cosine is shown beside the score (random-init scores clamp to 0; cosines do not).
    np.testing.assert_allclose(cosines, [a["cosine"] for a in answers], atol=1e-3)


def test_generated_client_for_every_endpoint(
    server: ServerProcess, images: list[bytes], tmp_path: Path
) -> None:
    import bentoml

    picture = tmp_path / "picture.jpg"
    picture.write_bytes(images[0])
    with bentoml.SyncHTTPClient(server.url) as generated:
        ranked = generated.evaluate_rank(image=b64(images[0]), texts=CAPTIONS)
        refs = generated.evaluate_single(
            image=b64(images[0]), text=CAPTIONS[0], references=["a kitten"], scale="paper"
        )
        image_vectors = generated.embed_images(images=[b64(images[0])])["embeddings"]
        text_vectors = generated.embed_texts(texts=CAPTIONS, model="ViT-B-32")["embeddings"]
        uploaded = generated.evaluate_single_upload(image=picture, text=CAPTIONS[0])
        batch = generated.evaluate_batch(
            items=[{"image": b64(images[0]), "text": CAPTIONS[0]}, {"image": "AAAA", "text": "x"}]
        )
    assert ranked["results"][0]["cosine"] == pytest.approx(refs["cosine"], abs=1e-5)
    assert uploaded["cosine"] == pytest.approx(refs["cosine"], abs=1e-5)
    assert batch["results"][0]["cosine"] == pytest.approx(refs["cosine"], abs=1e-5)
    assert batch["results"][1]["error"]["code"] == "invalid_image"
    assert refs["model"] == "ViT-B-32"
    assert refs["clip_s"] == pytest.approx(2.5 * max(refs["cosine"], 0))
    assert 0 <= refs["ref_clip_score"] <= 2.5
    assert len(image_vectors[0]) == 512 and len(text_vectors) == 3 and len(text_vectors[0]) == 512
