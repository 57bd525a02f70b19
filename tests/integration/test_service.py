"""The running service over real HTTP (httpx and BentoML's generated client)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from clip_testkit.images import b64, jpeg_bytes
from clip_testkit.metrics import metric
from clip_testkit.reference import reference_cosines
from clip_testkit.routes import BATCH, SINGLE
from clip_testkit.server import ServerProcess, model_folder

pytestmark = pytest.mark.integration

CAPTIONS = ["a photo of a cat", "a red bus in the rain", "a bowl of soup"]


def scrape(client: httpx.Client) -> str:
    response = client.get("/evaluator/metrics")
    assert response.status_code == 200, response.text
    assert "clip_model_batches_total" in response.text, response.text[-2000:]
    return response.text


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [jpeg_bytes(seed) for seed in range(3)]


def test_single_matches_open_clip(
    client: httpx.Client, bentoml_home: Path, images: list[bytes]
) -> None:
    expected = reference_cosines(model_folder(bentoml_home, "clip-vit-b-32"), images, CAPTIONS)
    for data, text, cosine in zip(images, CAPTIONS, expected, strict=True):
        response = client.post(SINGLE, json={"image": b64(data), "text": text})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["cosine"] == pytest.approx(cosine, abs=2e-6)
        assert body["score"] == pytest.approx(100 * max(cosine, 0), abs=2e-4)
        assert body["model"] == "ViT-B-32"
        assert body["weights"] == "random-init" and body["pretrained"] is None
        assert body["text_truncated"] is False
    again = client.post(SINGLE, json={"image": b64(images[0]), "text": CAPTIONS[0]}).json()
    first = client.post(
        SINGLE, json={"image": "data:image/jpeg;base64," + b64(images[0]), "text": CAPTIONS[0]}
    ).json()
    assert again["cosine"] == first["cosine"]  # deterministic, data URI or not


def test_batch_equals_single_in_order_with_item_errors(
    client: httpx.Client, images: list[bytes]
) -> None:
    items = [
        {"image": b64(images[0]), "text": CAPTIONS[0]},
        {"image": "bm90IGFuIGltYWdl", "text": "broken image"},
        {"image": b64(images[1]), "text": CAPTIONS[1]},
        {"image": b64(images[2]), "text": "   "},
        {"image": b64(images[2]), "text": CAPTIONS[2] + " and more" * 40},
        {"text": "no image"},
    ]
    response = client.post(BATCH, json={"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["succeeded"], body["failed"]) == (3, 3)
    assert [r["index"] for r in body["results"]] == list(range(6))
    codes = [r["error"]["code"] if r["error"] else None for r in body["results"]]
    assert codes == [None, "invalid_image", None, "empty_text", None, "invalid_request"]
    assert body["results"][4]["text_truncated"] is True
    for index in (0, 2, 4):
        single = client.post(SINGLE, json=items[index]).json()
        assert body["results"][index]["cosine"] == pytest.approx(single["cosine"], abs=1e-5)
        assert body["results"][index]["score"] == pytest.approx(single["score"], abs=1e-3)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"image": "AAAA", "text": "x"}, 422, "invalid_image"),
        ({"image": b64(jpeg_bytes(0, 64, 64)), "text": ""}, 422, "empty_text"),
        (
            {"image": b64(jpeg_bytes(0, 64, 64)), "text": "x", "model": "ViT-H-14"},
            422,
            "unknown_model",
        ),
        ({"image": b64(jpeg_bytes(0, 64, 64)), "text": "x" * 10_001}, 422, "text_too_long"),
        ({"text": "no image"}, 400, "invalid_request"),
        ({"image": 5, "text": "x"}, 400, "invalid_request"),
    ],
)
def test_single_errors_have_stable_codes(
    client: httpx.Client, payload: dict, status: int, code: str
) -> None:
    response = client.post(SINGLE, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in response.text
    assert error["request_id"] == response.headers["x-request-id"]


def test_unknown_model_lists_the_served_ones(client: httpx.Client) -> None:
    response = client.post(SINGLE, json={"image": "AAAA", "text": "x", "model": "RN50"})
    assert "ViT-B-32" in response.json()["error"]["message"]


def test_request_limits(client: httpx.Client) -> None:
    huge = {"image": "A" * (9 * 1024 * 1024), "text": "x"}
    response = client.post(SINGLE, json=huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    items = [{"image": "AAAA", "text": "x"}] * 33
    response = client.post(BATCH, json={"items": items})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_items"
    response = client.post(BATCH, json={"items": []})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_health_flags_untrained_weights(client: httpx.Client) -> None:
    response = client.get("/evaluator/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["default_model"] == "ViT-B-32"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"ViT-B-32"}
    for model in by_name.values():
        assert model["ready"] is True and model["untrained"] is True
        assert model["weights"] == "random-init"
        assert (model["device"], model["dtype"]) == ("cpu", "fp32")


def test_probes_docs_and_metrics(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    docs = client.get("/evaluator/docs", follow_redirects=True)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/docs.json").json()
    assert SINGLE in spec["paths"] and BATCH in spec["paths"]
    for path in ("/evaluator/metrics", "/metrics"):
        text = client.get(path).text
        assert "bentoml_service_request_total" in text
        assert "clip_model_batches_total" in text


def test_concurrent_singles_share_model_batches(
    client: httpx.Client, server: ServerProcess
) -> None:
    """Adaptive batching, proven from the server's own counters."""
    before = scrape(client)
    requests = 24
    payloads = [
        {"image": b64(jpeg_bytes(i % 4, 320, 240)), "text": f"caption {i % 6}"}
        for i in range(requests)
    ]

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            responses = await asyncio.gather(*(http.post(SINGLE, json=p) for p in payloads))
        return [r.status_code for r in responses]

    assert asyncio.run(fire()) == [200] * requests
    after = scrape(client)
    labels = {"model": "ViT-B-32"}
    batches = metric(after, "clip_model_batches_total", **labels) - metric(
        before, "clip_model_batches_total", **labels
    )
    items = metric(after, "clip_model_batch_items_sum", **labels) - metric(
        before, "clip_model_batch_items_sum", **labels
    )
    assert items == requests
    assert 1 <= batches < requests, f"{requests} requests ran in {batches} model batches"
