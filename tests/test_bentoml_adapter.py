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
