"""Shared fixtures. Nothing downloads weights: models are random-init, saved by the project's own
code, and correctness is checked against open_clip computed on the same weights."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = "clip-test-tiny"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny registered open_clip architecture, random-init, saved as a model entry."""
    import open_clip

    from clip_runtime.sources import save_random_init

    open_clip.add_model_config(FIXTURES / f"{TINY}.json")
    folder = tmp_path_factory.mktemp("tiny") / "entry"
    save_random_init(folder, TINY, seed=0)
    return folder


@pytest.fixture(scope="session")
def b32_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init ViT-B-32 (the real architecture and preprocessing), saved once per session."""
    from clip_runtime.sources import save_random_init

    folder = tmp_path_factory.mktemp("b32") / "entry"
    save_random_init(folder, "ViT-B-32", seed=0)
    return folder
