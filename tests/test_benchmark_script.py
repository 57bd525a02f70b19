"""Smoke test of scripts/benchmark.py's in-process measurements on the tiny model: the figures are
printed, never asserted (benchmarks are not tests); this only checks that the pieces run and the
report renders."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import torch

from clip_runtime import ClipEngine, ClipSettings
from clip_testkit.images import jpeg_bytes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("clip_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_benchmark_pieces_run_and_render(tiny_model_dir: Path) -> None:
    bench = load_script()
    config = bench.Config(True, 4, 1, 4, 2, 1.0, 1.0)
    engine = ClipEngine(
        ClipSettings(models=["ViT-B-32"], max_batch_size=2), {"ViT-B-32": tiny_model_dir}
    )
    model = engine.models["ViT-B-32"]
    pairs = [(jpeg_bytes(seed, 96, 72), "a cat") for seed in range(4)]
    rows = [
        bench.measure_ceiling(model, config),
        bench.measure_pipeline(engine, "ViT-B-32", pairs, "pipeline"),
        bench.measure_naive(tiny_model_dir, "ViT-B-32", pairs[:2], torch.device("cpu")),
    ]
    assert all(row.pairs_s > 0 and row.errors == 0 for row in rows)
    agreement = bench.agreement(model, [data for data, _ in pairs])
    assert set(agreement) == {"max_abs_uint8_levels", "max_abs_cosine"}
    result = {
        "started": "now",
        "command": "python scripts/benchmark.py --quick",
        "machine": bench.machine(torch.device("cpu")),
        "weights": "random-init",
        "images": "test",
        "notes": "",
        "rows": [asdict(row) for row in rows],
        "summary": {"ViT-B-32": {"ratio": 1.0}},
    }
    text = bench.markdown(result)
    assert text.count("| ViT-B-32 |") == 3 and "torch" in text
