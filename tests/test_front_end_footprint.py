"""The HTTP front end never loads torch: it crops with Pillow and ships uint8 crops and checked
captions; the model worker normalizes and tokenizes (docs/architecture-data-path.md). torch,
torchvision and open_clip held ~850 MB in every front-end worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_runtime.decode_placement import cuda_expected, forwarded_models
from clip_runtime.engine import device_decoded_models
from clip_runtime.model_entry import read_entry
from clip_runtime.settings import ClipSettings

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip")

# Everything a front-end worker runs for a pair: the service module (as `bentoml serve` imports
# it), the preprocessing it builds, and a job made from a base64 JPEG and a caption.
FRONT_END_PAIR = """
import asyncio, json, sys
from pathlib import Path
from clip_runtime.preprocessing import Preprocessing, fetch_policy
from clip_service import evaluator
from clip_service.inputs import JobBuilder
from clip_testkit.sample_images import b64, jpeg_bytes

settings = evaluator.settings
preprocessing = Preprocessing(settings, {"ViT-B-32": Path(sys.argv[1])})
jobs = JobBuilder(settings, preprocessing, fetch_policy(settings))
pair = asyncio.run(jobs.pair("ViT-B-32", b64(jpeg_bytes(1, 640, 480)), "a red bus"))
print(json.dumps({
    "crop": [str(pair.job.image.dtype), list(pair.job.image.shape)],
    "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:])),
}))
"""


def test_a_front_end_worker_never_imports_torch(bentoml_home: Path, b32_model_dir: Path) -> None:
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "CLIP_MODELS": "ViT-B-32",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", FRONT_END_PAIR, str(b32_model_dir), *HEAVY],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["crop"] == ["uint8", [224, 224, 3]]  # the crop, made here, 1 byte a value
    assert seen["heavy"] == [], f"the front end imported {seen['heavy']}"


@pytest.mark.parametrize("gpu_decode", ["auto", "on", "off"])
@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_the_front_end_predicts_the_model_workers_decode_placement(
    b32_model_dir: Path, gpu_decode: str, device: str
) -> None:
    """Without torch, the front end forwards JPEGs exactly where the engine decodes them."""
    settings = ClipSettings(models=["ViT-B-32"], gpu_decode=gpu_decode, device=device)
    entries = {"ViT-B-32": read_entry(b32_model_dir)}
    assert forwarded_models(settings, entries) == device_decoded_models(settings, entries)


def test_cuda_is_expected_only_where_the_driver_shows_a_visible_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus = tmp_path / "gpus"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not cuda_expected("auto", gpus)  # no driver
    (gpus / "0000:01:00.0").mkdir(parents=True)
    assert cuda_expected("auto", gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not cuda_expected("auto", gpus)
    assert cuda_expected("cuda:1", gpus) and not cuda_expected("cpu", gpus)
