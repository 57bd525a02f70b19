from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server import ServerProcess, save_random_init_models

# Small limits so that violating them is cheap to test.
SERVER_ENV = {"CLIP_MAX_REQUEST_BYTES": str(8 * 1024 * 1024), "CLIP_MAX_BATCH_ITEMS": "32"}


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml_home")
    save_random_init_models(home, ["ViT-B-32", "ViT-L-14"])
    return home


@pytest.fixture(scope="session")
def server(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `bentoml serve` with both models (the default configuration)."""
    process = ServerProcess(bentoml_home, tmp_path_factory.mktemp("logs") / "serve.log", SERVER_ENV)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as http:
        yield http
