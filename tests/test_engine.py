"""The engine scores exactly what open_clip computes on the same weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from clip_runtime import ClipEngine, ClipSettings, Job, JobOutcome
from clip_runtime.errors import EmptyTextError, InvalidImageError, UnknownModelError
from clip_runtime.image_inputs import ImageLimits
from clip_runtime.model import ClipModel
from clip_runtime.runtimes import torch_plan
from clip_testkit.reference import reference_cosines
from clip_testkit.sample_images import jpeg_bytes

LIMITS = ImageLimits(max_image_bytes=10_000_000, max_image_pixels=50_000_000, min_image_side=4)
CAPTIONS = ["a photo of a cat", "a diagram of a bridge", "two dogs on a beach at sunset"]


def load(folder: Path, cache: int = 16) -> ClipModel:
    return ClipModel("test", folder, torch_plan(torch.device("cpu")), LIMITS, cache)


def score(model: ClipModel, crops: list[np.ndarray], texts: list[str]) -> list[JobOutcome]:
    return model.score_batch(crops, texts, [False] * len(crops))


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "b32_model_dir"])
def test_scores_match_open_clip(model_dir: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model_dir)
    images = [jpeg_bytes(seed) for seed in range(3)]
    model = load(folder)
    crops = [model.preprocessor.from_bytes(data) for data in images]
    ours = [pair.cosine for pair in score(model, crops, CAPTIONS)]
    expected = reference_cosines(folder, images, CAPTIONS)
    np.testing.assert_allclose(ours, expected, atol=2e-6)
    assert len(set(np.round(ours, 6))) == 3  # distinct pairs give distinct scores


def test_batch_equals_single_and_is_deterministic(tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir)
    crops = [model.preprocessor.from_bytes(jpeg_bytes(seed)) for seed in range(3)]
    together = [pair.cosine for pair in score(model, crops, CAPTIONS)]
    alone = [
        score(model, [crop], [text])[0].cosine for crop, text in zip(crops, CAPTIONS, strict=True)
    ]
    np.testing.assert_allclose(together, alone, atol=1e-6)
    again = [pair.cosine for pair in score(load(tiny_model_dir), crops, CAPTIONS)]
    assert again == together


def test_score_scale_is_torchmetrics(tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir)
    crops = [model.preprocessor.from_bytes(jpeg_bytes(seed)) for seed in range(8)]
    pairs = score(model, crops, [f"caption number {i}" for i in range(8)])
    for pair in pairs:
        assert pair.cosine is not None
        assert pair.score == pytest.approx(100 * max(pair.cosine, 0.0))
        assert -1.0 <= pair.cosine <= 1.0


def test_text_cache_returns_identical_embeddings_and_counts(tiny_model_dir: Path) -> None:
    from clip_runtime.model import BatchReport

    model = load(tiny_model_dir, cache=8)
    first_report, second_report = BatchReport(), BatchReport()
    first = model.encode_texts(["red", "green", "red"], first_report)
    second = model.encode_texts(["green", "red"], second_report)
    assert (first_report.text_cache_hits, first_report.text_cache_misses) == (0, 2)
    assert (second_report.text_cache_hits, second_report.text_cache_misses) == (2, 0)
    assert torch.equal(first[0].vector, second[1].vector)
    # Without the cache the same text is encoded again: equal up to batch-size rounding.
    uncached = load(tiny_model_dir, cache=0).encode_texts(["red", "green"])
    assert torch.equal(uncached[0].vector, first[0].vector)


def test_long_captions_truncate_keeping_end_of_text(tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir)
    short, long = "a cat " * 30, "a cat " * 80
    assert not model.is_truncated(short)
    assert model.is_truncated(long)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")
    tokens = tokenizer([long])[0]
    assert tokens[-1].item() == tokenizer.eot_token_id  # open_clip keeps EOT; slicing would not
    crop = model.preprocessor.from_bytes(jpeg_bytes(1))
    (pair,) = score(model, [crop], [long])
    assert pair.text_truncated


def test_engine_groups_models_and_keeps_order(tiny_model_dir: Path) -> None:
    settings = ClipSettings(models=["ViT-B-32", "other"], max_batch_size=2)
    engine = ClipEngine(settings, {"ViT-B-32": tiny_model_dir, "other": tiny_model_dir})
    crop = engine.models["ViT-B-32"].preprocessor.from_bytes(jpeg_bytes(2))
    jobs = [Job("ViT-B-32" if i % 2 else "other", crop, f"text {i}") for i in range(5)]
    outcomes, reports = engine.run_jobs(jobs)
    alone = [score(engine.models[job.model], [crop], [str(job.text)])[0].cosine for job in jobs]
    np.testing.assert_allclose([o.cosine for o in outcomes], alone, atol=1e-6)
    assert reports["other"].items == 3 and reports["ViT-B-32"].items == 2


def test_run_decodes_encoded_images_and_keeps_per_job_errors(tiny_model_dir: Path) -> None:
    engine = ClipEngine(ClipSettings(models=["ViT-B-32"]), {"ViT-B-32": tiny_model_dir})
    model = engine.models["ViT-B-32"]
    jobs = [
        Job("ViT-B-32", jpeg_bytes(0), "ok"),
        Job("ViT-B-32", b"not an image", "x"),
        Job("ViT-B-32", jpeg_bytes(0), "  "),
        Job("ViT-B-32", model.preprocessor.from_bytes(jpeg_bytes(0)), "ok"),
        Job("ViT-B-32", text="only a text"),
    ]
    results, _ = engine.run_jobs(jobs)
    assert isinstance(results[1].error, InvalidImageError)
    assert isinstance(results[2].error, EmptyTextError)
    assert results[0].error is None and results[0].cosine is not None
    assert results[0].cosine == pytest.approx(results[3].cosine, abs=1e-6)  # bytes == crop
    assert results[4].cosine is None and results[4].text_vector is not None
    with pytest.raises(UnknownModelError, match="served models"):
        engine.model("ViT-H-14")


def test_warm_up_marks_ready(tiny_model_dir: Path) -> None:
    engine = ClipEngine(ClipSettings(models=["ViT-B-32"]), {"ViT-B-32": tiny_model_dir})
    assert not engine.ready
    engine.warm_up()
    assert engine.ready


def test_the_front_end_half_imports_without_torch() -> None:
    """The HTTP worker accepts connections (and answers probes) only after its imports: what it
    imports of the engine must not pull in torch or open_clip (~13 s on a loaded 2-core box)."""
    code = (
        "import sys, clip_runtime, clip_runtime.preprocessing, clip_service.inputs, "
        "clip_service.middleware, clip_service.bentoml_adapter, clip_service.store; "
        "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
