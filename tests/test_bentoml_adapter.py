"""Every private BentoML name that ``clip_service.bentoml_adapter`` relies on still exists: a
BentoML upgrade that moves one fails here, by name, instead of in a running service."""

from __future__ import annotations

import importlib
from functools import reduce

import pytest

from clip_service.bentoml_adapter import PRIVATE_API


@pytest.mark.parametrize(("module", "path"), PRIVATE_API)
def test_private_api_still_exists(module: str, path: str) -> None:
    found = reduce(getattr, path.split("."), importlib.import_module(module))
    assert found is not None


async def _app(scope: object, receive: object, send: object) -> None:
    return None


@pytest.mark.parametrize(("given", "expected"), [(None, 7), (3, 3)])
def test_drain_bound_reaches_uvicorns_server(given: int | None, expected: int) -> None:
    """The bound lands on the uvicorn server whose SIGTERM handler is installed; a bound from
    the command line (``--timeout-graceful-shutdown``) is kept. Fails if uvicorn stops
    installing its bound ``handle_exit`` as the handler."""
    import uvicorn

    from clip_service.bentoml_adapter import bound_graceful_shutdown

    server = uvicorn.Server(uvicorn.Config(_app, timeout_graceful_shutdown=given))
    with server.capture_signals():
        assert bound_graceful_shutdown(7)
    assert server.config.timeout_graceful_shutdown == expected


def test_drain_bound_without_a_server_does_nothing() -> None:
    from clip_service.bentoml_adapter import bound_graceful_shutdown

    assert not bound_graceful_shutdown(7)


@pytest.mark.parametrize(
    ("device", "gpus", "resources"),
    [
        ("auto", 1, {"gpu": 1}),
        ("cuda", 2, {"gpu": 1}),
        ("auto", 0, {}),  # CPU host: no GPU declared, so BentoML neither warns nor pins
        ("cpu", 1, {}),
        ("cuda:1", 2, {}),  # the operator's index; CUDA_VISIBLE_DEVICES would renumber it
    ],
)
def test_model_worker_declares_a_gpu_only_where_it_serves_on_one(
    device: str, gpus: int, resources: dict[str, int]
) -> None:
    from clip_service.bentoml_adapter import accelerator_resources

    assert accelerator_resources(device, gpus) == resources
