"""Smoke test of scripts/measure_model_cost.py on the tiny models: it prints figures, so this checks
that they are produced and plausible, never how fast anything is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_model_cost.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("measure_model_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("model_dir", "family", "context"),
    [("tiny_model_dir", "clip", 77), ("siglip_model_dir", "siglip", 64)],
)
def test_measures_each_family(
    script: ModuleType, model_dir: str, family: str, context: int, request: pytest.FixtureRequest
) -> None:
    cost = script.measure("m", request.getfixturevalue(model_dir), repeats=1)
    assert (cost.family, cost.context) == (family, context)
    assert cost.weights_mib > 0 and cost.load_s > 0 and cost.batch_ms > 0
    assert cost.row().startswith(f"m | {family} | {context} | ")
