"""The OpenVINO runtime scores what open_clip's torch fp32 computes on the same weights (within
the documented bounds), its converted models are cached and never trusted blindly, and settings
it cannot honour are refused at start."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_runtime import ClipEngine, ClipSettings, Job
from clip_runtime.errors import RuntimeSetupError
from clip_runtime.image_inputs import ImageLimits
from clip_runtime.model import ClipModel
from clip_runtime.model_entry import read_entry
from clip_runtime.runtimes import RuntimePlan, cpu_has_native_bf16, resolve_runtime, torch_plan
from clip_testkit.reference import reference_cosines
from clip_testkit.sample_images import jpeg_bytes

pytest.importorskip("openvino", reason="openvino is not installed (CLIP_RUNTIME=torch only)")
from clip_runtime import openvino_runtime

LIMITS = ImageLimits(max_image_bytes=10_000_000, max_image_pixels=50_000_000, min_image_side=4)
FP32_BOUND = 1e-4
BF16_BOUND = 3e-3
# Odd captions: one far over the 77-token context (cut), unicode and emoji, one word.
CAPTIONS = [
    "a photo of a cat",
    " ".join(["a very long caption about a red bridge over a river at dawn"] * 12),
    "Ünïcödé: 東京の夜景、ネオンと雨 🌧️🐈 — «quoted» façade",
    "x",
]


def plan(cache_dir: Path, dtype: torch.dtype = torch.float32) -> RuntimePlan:
    return RuntimePlan(
        runtime="openvino",
        device=torch.device("cpu"),
        dtype=dtype,
        cache_dir=cache_dir,
        threads=torch.get_num_threads(),
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: each entry converts once, fp32 and bf16 share it."""
    return tmp_path_factory.mktemp("openvino-cache")


def served_cosines(model: ClipModel, images: list[bytes]) -> list[float]:
    crops = [model.preprocessor.from_bytes(data) for data in images]
    outcomes = model.score_batch(crops, CAPTIONS, [False] * len(crops))
    return [outcome.cosine for outcome in outcomes]


def check_against_open_clip(folder: Path, model: ClipModel, bound: float) -> None:
    images = [jpeg_bytes(seed) for seed in range(len(CAPTIONS))]
    ours = served_cosines(model, images)
    expected = reference_cosines(folder, images, CAPTIONS)
    worst = float(np.max(np.abs(np.array(ours) - np.array(expected))))
    print(f"{model.info.architecture} openvino {model.info.dtype}: worst |cos diff| {worst:.2e}")
    np.testing.assert_allclose(ours, expected, atol=bound, rtol=0)


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "siglip_model_dir", "b32_model_dir"])
def test_fp32_matches_open_clip_torch(
    model_dir: str, cache_dir: Path, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue(model_dir)
    model = ClipModel("test", folder, plan(cache_dir), LIMITS, 16)
    assert (model.info.runtime, model.info.dtype) == ("openvino", "fp32")
    check_against_open_clip(folder, model, FP32_BOUND)
    on_torch = ClipModel("ref", folder, torch_plan(torch.device("cpu")), LIMITS, 0)
    assert model.family == on_torch.family
    assert model.logit_scale == pytest.approx(on_torch.logit_scale, rel=1e-6)
    if on_torch.logit_bias is None:
        assert model.logit_bias is None
    else:
        assert model.logit_bias == pytest.approx(on_torch.logit_bias, rel=1e-6)


def test_bf16_within_its_bound(b32_model_dir: Path, cache_dir: Path) -> None:
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AMX or AVX512_BF16): bf16 is refused here")
    model = ClipModel("test", b32_model_dir, plan(cache_dir, torch.bfloat16), LIMITS, 16)
    assert model.info.dtype == "bf16"
    check_against_open_clip(b32_model_dir, model, BF16_BOUND)


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny entry's converted towers, cached once for the module in a cache of their own
    (the first start there must convert)."""
    cache = tmp_path_factory.mktemp("tiny-openvino-cache")
    before = openvino_runtime.stats.conversions
    ClipModel("test", tiny_model_dir, plan(cache), LIMITS, 0)
    assert openvino_runtime.stats.conversions == before + 1
    return cache


def test_second_start_reads_the_cache(tiny_model_dir: Path, tiny_cache: Path) -> None:
    before = openvino_runtime.stats.conversions
    first = ClipModel("test", tiny_model_dir, plan(tiny_cache), LIMITS, 0)
    second = ClipModel("test", tiny_model_dir, plan(tiny_cache), LIMITS, 0)
    assert openvino_runtime.stats.conversions == before  # no conversion: the cache served
    images = [jpeg_bytes(seed) for seed in range(len(CAPTIONS))]
    assert served_cosines(first, images) == served_cosines(second, images)


@pytest.mark.parametrize("damaged", ["image.bin", "manifest.json"])
def test_a_corrupt_cache_is_rebuilt(
    damaged: str,
    tiny_model_dir: Path,
    tiny_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = read_entry(tiny_model_dir)
    folder = openvino_runtime.cache_folder(tmp_path, entry)
    shutil.copytree(openvino_runtime.cache_folder(tiny_cache, entry), folder)
    path = folder / damaged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    before = openvino_runtime.stats.conversions
    with caplog.at_level(logging.WARNING, logger="clip_runtime.openvino_runtime"):
        model = ClipModel("test", tiny_model_dir, plan(tmp_path), LIMITS, 0)
    assert openvino_runtime.stats.conversions == before + 1
    assert "rejected" in caplog.text
    assert openvino_runtime.verify_cache(folder, entry) is None  # rebuilt whole
    check_against_open_clip(tiny_model_dir, model, FP32_BOUND)


def test_the_engine_runs_on_the_openvino_runtime(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = ClipSettings(
        models=["tiny"], runtime="openvino", precision="fp32", runtime_cache_dir=cache_dir
    )
    engine = ClipEngine(settings, {"tiny": tiny_model_dir})
    assert engine.models["tiny"].info.runtime == "openvino"
    images = [jpeg_bytes(seed) for seed in range(len(CAPTIONS))]
    pairs = zip(images, CAPTIONS, strict=True)
    jobs = [Job(model="tiny", image=data, text=text) for data, text in pairs]
    outcomes, _ = engine.run_jobs(jobs)
    expected = reference_cosines(tiny_model_dir, images, CAPTIONS)
    np.testing.assert_allclose([o.cosine for o in outcomes], expected, atol=FP32_BOUND, rtol=0)


# -- what CLIP_RUNTIME / CLIP_PRECISION resolve to, and what is refused at start ----------------


def test_auto_is_openvino_on_cpu_with_bf16_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    for native, dtype in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr("clip_runtime.runtimes.cpu_has_native_bf16", lambda n=native: n)
        chosen = resolve_runtime(ClipSettings(device="cpu", runtime="auto"))
        assert (chosen.runtime, chosen.dtype) == ("openvino", dtype)
    chosen = resolve_runtime(ClipSettings(device="cpu", runtime="torch"))
    assert (chosen.runtime, chosen.dtype) == ("torch", torch.float32)


def test_auto_is_torch_without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clip_runtime.runtimes.openvino_installed", lambda: False)
    assert resolve_runtime(ClipSettings(device="cpu", runtime="auto")).runtime == "torch"


def test_openvino_missing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clip_runtime.runtimes.openvino_installed", lambda: False)
    with pytest.raises(RuntimeSetupError, match=r"not installed.*CLIP_RUNTIME=torch"):
        resolve_runtime(ClipSettings(device="cpu", runtime="openvino"))


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_bf16_without_native_bf16_is_refused(runtime: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clip_runtime.runtimes.cpu_has_native_bf16", lambda: False)
    settings = ClipSettings(device="cpu", runtime=runtime, precision="bf16")
    with pytest.raises(RuntimeSetupError, match=r"no native bf16.*CLIP_PRECISION=fp32"):
        resolve_runtime(settings)


def test_openvino_fp16_is_refused() -> None:
    settings = ClipSettings(device="cpu", runtime="openvino", precision="fp16")
    with pytest.raises(RuntimeSetupError, match="CLIP_PRECISION=bf16, fp32 or auto"):
        resolve_runtime(settings)
