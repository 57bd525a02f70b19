"""The session's shared server, and ViT-L-14 for the tests that need it.

Every server the suite starts serves random-init models from the one store (``bentoml_home`` in
tests/conftest.py) saved once per session by the project's own script. The shared ``server``
serves ViT-B-32 only; ViT-L-14 is saved (when first asked for) and served only for the smoke test
(test_vit_l_14.py), and packaging records it. A test that stops or kills a server starts its own:
the shared one must outlive the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clip_testkit.server import ServerProcess
from tests.conftest import save_once

# Small limits so that violating them is cheap to test.
SERVER_ENV = {
    "CLIP_MODELS": "ViT-B-32",
    "CLIP_MAX_REQUEST_BYTES": str(8 * 1024 * 1024),
    "CLIP_MAX_BATCH_ITEMS": "32",
    "CLIP_RETRY_AFTER_S": "2",
    # The shared server tests answers, not shedding (load_tests.faults and the reliability tests
    # do that on servers of their own): on a shared 2-core CI box a burst of 24 ViT-B-32 pairs can
    # take longer than the 10 s default budget, and a shed there would be noise, not a finding.
    "CLIP_MAX_LATENCY_MS": "120000",
}


@pytest.fixture(scope="session")
def l14_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same store with random-init ViT-L-14 added (saved only when a test asks for it)."""
    return save_once(tmp_path_factory, ["ViT-B-32", "ViT-L-14"])


@pytest.fixture(scope="session")
def server(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `bentoml serve` of ViT-B-32 shared by every module that does not change its server."""
    process = ServerProcess(bentoml_home, tmp_path_factory.mktemp("logs") / "serve.log", SERVER_ENV)
    process.start()
    yield process
    still_running = process.process is not None and process.process.poll() is None
    process.stop()
    assert still_running, "a test stopped the shared server: such a test must start its own"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as http:
        yield http
