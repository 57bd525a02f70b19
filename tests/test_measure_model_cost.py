"""Smoke test of scripts/measure_model_cost.py on the tiny models: it prints figures, so this checks
that they are produced and plausible, never how fast anything is."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_model_cost.py"


@pytest.fixture(scope="module")
def script() -> dict[str, Any]:
    return runpy.run_path(str(SCRIPT), run_name="measure_model_cost")


@pytest.mark.parametrize(
    ("model_dir", "family", "context"),
    [("tiny_model_dir", "clip", 77), ("siglip_model_dir", "siglip", 64)],
)
def test_measures_each_family(
    script: dict[str, Any],
    model_dir: str,
    family: str,
    context: int,
    request: pytest.FixtureRequest,
) -> None:
    cost = script["measure"]("m", request.getfixturevalue(model_dir), repeats=1)
    assert (cost.family, cost.context) == (family, context)
    assert cost.weights_mib > 0 and cost.load_s > 0 and cost.batch_ms > 0
    assert cost.row().startswith(f"m | {family} | {context} | ")
