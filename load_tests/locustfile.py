"""Locust workloads for the CLIP-score service (images generated deterministically at start).

Run headless through ``python -m load_tests.run`` (``make load-test``), or directly:
``python -m locust -f load_tests/locustfile.py --host http://127.0.0.1:3000`` from the
repository root (so that ``load_tests`` imports).

A deliberate shed (503/429 with Retry-After and the error code ``overloaded``) and the expected
4xx of the bad-input user count as successes: both are the service doing its job. Anything else
non-200 is a failure, ``503 model_not_ready`` included: nothing here kills the model worker.

A service with ``CLIP_API_KEYS`` needs ``--api-key KEY`` (or ``CLIP_API_KEY`` in the environment):
every request then carries ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import base64
import io
import random
from typing import Any

import numpy as np
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from PIL import Image

from load_tests.verdicts import error_code, is_deliberate_shed

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"
SIZES = [(64, 64), (224, 224), (320, 240), (640, 480), (1024, 768)]
CAPTIONS = [
    "a photo of a cat",
    "a red bus in the rain",
    "a bowl of soup on a wooden table",
    "two people walking on a beach at sunset",
    "a diagram of a neural network",
]


def _image(seed: int, width: int, height: int) -> str:
    """Smooth waves plus noise: compresses like a photo; the same bytes on every run."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    waves = np.stack(
        [np.sin(xx / (20 + 9 * c) + seed) * np.cos(yy / (15 + 7 * c)) for c in range(3)], -1
    )
    pixels = ((waves + 1) * 100 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


# Built once per Locust process, before any user starts.
IMAGES: dict[tuple[int, int], list[str]] = {
    size: [_image(seed, *size) for seed in range(3)] for size in SIZES
}
RNG = random.Random(0)


def _pick_image(rng: random.Random) -> str:
    return rng.choice(IMAGES[rng.choice(SIZES)])


def _check(response: Any, expected: set[int]) -> None:
    """200, a shed (503/429 ``overloaded`` with Retry-After) or an expected 4xx passes; anything
    else fails.

    Shed and expected-4xx answers are recorded under their own names (``NAME [shed]``,
    ``NAME [4xx]``) so that the percentiles of served requests are not mixed with them.
    """
    status = response.status_code
    code = None if status == 200 else error_code(response.text or "")
    shed = is_deliberate_shed(status, response.headers.get("retry-after"), code)
    if status == 200:
        response.success()
    elif shed or status in expected:
        response.request_meta["name"] += " [shed]" if shed else " [4xx]"
        response.success()
    else:
        response.failure(f"unexpected {status}: {response.text[:200]}")


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--api-key",
        env_var="CLIP_API_KEY",
        default="",
        is_secret=True,
        help="the service's API key, sent as 'Authorization: Bearer KEY' (env CLIP_API_KEY)",
    )


class ClipUser(FastHttpUser):
    """Sends the API key, when one is given, with every request."""

    abstract = True

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        api_key = getattr(options, "api_key", "") if options else ""
        if api_key:
            self.default_headers = {"Authorization": f"Bearer {api_key}"}
        super().__init__(environment)


class SingleUser(ClipUser):
    """One pair per request, random image size and caption."""

    weight = 4
    wait_time = between(0.0, 0.2)

    @task
    def single(self) -> None:
        body = {"image": _pick_image(RNG), "text": RNG.choice(CAPTIONS)}
        with self.client.post(SINGLE, json=body, name="single", catch_response=True) as response:
            _check(response, set())


class BatchUser(ClipUser):
    """Batches of 1-16 pairs of mixed image sizes."""

    weight = 2
    wait_time = between(0.1, 0.5)

    @task
    def batch(self) -> None:
        items = [
            {"image": _pick_image(RNG), "text": RNG.choice(CAPTIONS)}
            for _ in range(RNG.randint(1, 16))
        ]
        with self.client.post(
            BATCH, json={"items": items}, name="batch", catch_response=True
        ) as response:
            _check(response, set())


class RepeatedPromptUser(ClipUser):
    """The same caption for every image (prompt sweeps): exercises the text embedding cache."""

    weight = 2
    wait_time = between(0.0, 0.2)

    @task
    def repeated(self) -> None:
        items = [{"image": _pick_image(RNG), "text": CAPTIONS[0]} for _ in range(4)]
        with self.client.post(
            BATCH, json={"items": items}, name="batch-repeated-prompt", catch_response=True
        ) as response:
            _check(response, set())


class BadInputUser(ClipUser):
    """A small share of malformed requests: each must get its documented 4xx, fast."""

    weight = 1
    wait_time = between(0.2, 1.0)

    @task(3)
    def not_an_image(self) -> None:
        body = {"image": base64.b64encode(b"not an image").decode(), "text": "a cat"}
        with self.client.post(SINGLE, json=body, name="bad-image", catch_response=True) as r:
            _check(r, {422})

    @task(2)
    def empty_text(self) -> None:
        body = {"image": IMAGES[(64, 64)][0], "text": "   "}
        with self.client.post(SINGLE, json=body, name="bad-empty-text", catch_response=True) as r:
            _check(r, {422})

    @task(1)
    def malformed_json(self) -> None:
        with self.client.post(
            SINGLE,
            data="{not json",  # ASCII: sent as these bytes
            headers={"content-type": "application/json"},
            name="bad-json",
            catch_response=True,
        ) as r:
            _check(r, {400})
