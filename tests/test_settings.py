from __future__ import annotations

import pytest
from pydantic import ValidationError

from clip_runtime.settings import ClipSettings


def test_defaults_serve_both_models() -> None:
    settings = ClipSettings()
    assert settings.models == ["ViT-B-32", "ViT-L-14"]
    assert settings.default_model == "ViT-B-32"
    assert (settings.device, settings.precision) == ("auto", "auto")


def test_env_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_MODELS", "ViT-L-14")
    monkeypatch.setenv("CLIP_PRECISION", "bf16")
    monkeypatch.setenv("CLIP_MAX_BATCH_ITEMS", "12")
    settings = ClipSettings()
    assert settings.models == ["ViT-L-14"]
    assert settings.default_model == "ViT-L-14"  # the served one when ViT-B-32 is not
    assert settings.precision == "bf16" and settings.max_batch_items == 12


def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_PRECISION", "fp8")
    with pytest.raises(ValidationError):
        ClipSettings()
    monkeypatch.delenv("CLIP_PRECISION")
    with pytest.raises(ValidationError, match="not among"):
        ClipSettings(models=["ViT-L-14"], default_model="ViT-B-32")


def test_configuration_doc_is_what_the_settings_generate() -> None:
    """docs/configuration.md is exactly the output of `python -m clip_runtime.settings`."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    generated = subprocess.run(
        [sys.executable, "-m", "clip_runtime.settings"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout
    assert "| `CLIP_MODELS` |" in generated
    checked_in = (root / "docs" / "configuration.md").read_text()
    assert checked_in == generated, "docs/configuration.md is stale: run make settings-table"


def test_device_and_precision_resolution() -> None:
    import torch

    from clip_runtime.device import resolve_device, resolve_dtype

    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_per_model_batching_overrides_the_global_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("CLIP_MODEL_MAX_BATCH_SIZE", "ViT-B-32=256, ViT-L-14=128")
    monkeypatch.setenv("CLIP_MODEL_MAX_LATENCY_MS", "ViT-L-14=5000")
    settings = ClipSettings()
    assert settings.batch_size_for("ViT-B-32") == 256
    assert settings.batch_size_for("ViT-L-14") == 128
    assert settings.batch_size_for("other") == 32
    assert settings.latency_ms_for("ViT-L-14") == 5000
    assert settings.latency_ms_for("ViT-B-32") == settings.max_latency_ms
    with pytest.raises(ValidationError):
        ClipSettings.model_validate({"model_max_batch_size": "ViT-B-32"})
    with pytest.raises(ValidationError):
        ClipSettings.model_validate({"model_max_batch_size": "ViT-B-32=0"})
