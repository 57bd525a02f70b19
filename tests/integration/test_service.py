"""The running service over real HTTP (httpx and BentoML's generated client)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from clip_testkit.metrics import metric
from clip_testkit.reference import reference_cosines
from clip_testkit.routes import BATCH, SINGLE
from clip_testkit.sample_images import b64, jpeg_bytes
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
        assert (model["device"], model["dtype"], model["runtime"]) == ("cpu", "fp32", "torch")


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


ROOT_DIR = Path(__file__).resolve().parents[2]
# The README's first request and the API document's examples, run as a user would.
EXAMPLE_DOCS = (ROOT_DIR / "README.md", ROOT_DIR / "docs" / "api.md")
SAMPLE_IMAGE = Path("examples") / "grace_hopper.jpg"  # ships with the repository
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Request examples are made of these lines; blocks that also save models or start a server are
# walkthroughs for other set-ups (a third model), not examples against the default service.
_REQUEST_LINE = re.compile(r"^(IMG=|printf |curl |\s)")


def _doc_examples() -> list[tuple[str, str, str | None]]:
    """(language, block, the ```json block right after it, if any) for every fenced block that
    calls the service: curl commands, and ``POST /path {json} -> {answer}`` sketches."""
    fences = [fence for doc in EXAMPLE_DOCS for fence in _FENCE.finditer(doc.read_text())]
    examples = []
    for index, fence in enumerate(fences):
        language, block = fence.group(1), fence.group(2)
        following = fences[index + 1] if index + 1 < len(fences) else None
        answer = None
        if following and following.group(1) == "json" and following.start() - fence.end() < 5:
            answer = following.group(2)
        requests_only = all(_REQUEST_LINE.match(line) for line in block.splitlines() if line)
        if language == "bash" and "curl -s localhost:3000/evaluator/" in block and requests_only:
            examples.append((language, block, answer))
        elif language == "json" and block.startswith("POST /evaluator/"):
            examples.append((language, block, None))
    return examples


def _keys(sketch: str) -> set[str]:
    return set(re.findall(r'"(\w+)":', sketch))


def _all_keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _all_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _all_keys(v)}
    return set()


def _sketch_requests(block: str) -> tuple[list[tuple[str, str]], str]:
    """``POST /path {json}`` lines (the JSON inline or on the next lines) and the answer after
    ``->``; ``...`` in a list means "more of the same" and is dropped."""
    sent, _, answer = block.partition("->")
    requests: list[list[str]] = []
    for line in sent.splitlines():
        if line.startswith("POST "):
            _, path, *body = line.split(maxsplit=2)
            requests.append([path, "".join(body)])
        elif requests:
            requests[-1][1] += line
    return [(path, body.replace(", ...]", "]")) for path, body in requests], answer


def test_doc_request_examples_work_as_written(server: ServerProcess, tmp_path: Path) -> None:
    """Every curl example of the README and docs/api.md runs from a copy of the repository's
    sample image and answers 200 with the fields shown; every ``POST`` sketch is sent with that
    image."""
    (tmp_path / SAMPLE_IMAGE.parent).mkdir()
    shutil.copyfile(ROOT_DIR / SAMPLE_IMAGE, tmp_path / SAMPLE_IMAGE)
    image = b64((ROOT_DIR / SAMPLE_IMAGE).read_bytes())
    examples = [e for e in _doc_examples() if "docker" not in e[1]]
    assert len(examples) >= 7, "the request examples of the docs were not found"
    # The Single example's variable, reused by the examples below it.
    shared = f"IMG=$(base64 -w0 {SAMPLE_IMAGE})\n"
    shown_by_path: dict[str, set[str]] = {}
    answers: list[tuple[str, str, set[str]]] = []  # (example, status, fields answered)
    for language, block, answer in examples:
        if language == "bash":
            script = shared + block.replace("localhost:3000", server.url.removeprefix("http://"))
            script = script.replace("curl -s ", "curl -s -w '\\n%{http_code}' ")
            run = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert run.returncode == 0, (block, run.stderr)
            body, _, status = run.stdout.rstrip().rpartition("\n")
            path = re.findall(r"localhost:3000(/\S+)", block)[0]
            if answer:
                shown_by_path[path] = _keys(answer)
            # An upload example without an answer of its own: "Same answer as the JSON endpoint".
            shown = shown_by_path.get(path) or shown_by_path[path.removesuffix("/upload")]
            answers.append((block, status, shown - _all_keys(json.loads(body))))
            continue
        requests, answer_sketch = _sketch_requests(block)
        for path, sent in requests:
            payload = json.loads(json.dumps(json.loads(sent)).replace("<base64>", image))
            response = httpx.post(f"{server.url}{path}", json=payload, timeout=300)
            missing = _keys(answer_sketch) - _all_keys(response.json())
            answers.append((path, str(response.status_code), missing))
    assert len(answers) >= 7  # single, batch, health, upload; rank, both embeddings
    for example, status, missing in answers:
        assert status == "200", example
        assert not missing, (example, missing)
