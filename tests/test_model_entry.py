"""The store entry format: safetensors weights, recorded sha256, refusal of tampered weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_runtime.errors import ModelStoreError
from clip_runtime.image_inputs import ImageLimits
from clip_runtime.model import ClipModel
from clip_runtime.model_entry import (
    METADATA_FILE,
    WEIGHTS_FILE,
    read_entry,
    sha256_of,
    store_name,
    verify_weights,
)
from clip_runtime.runtimes import torch_plan
from clip_runtime.sources import save_random_init

LIMITS = ImageLimits(10_000_000, 50_000_000, 4)
ROOT = Path(__file__).resolve().parent.parent


def test_store_names() -> None:
    assert store_name("ViT-B-32") == "clip-vit-b-32"
    assert store_name("ViT-L-14") == "clip-vit-l-14"


def test_entry_records_source_and_hash(tiny_model_dir: Path) -> None:
    entry = read_entry(tiny_model_dir)
    assert entry.weights == "random-init" and entry.untrained
    assert entry.pretrained is None and entry.seed == 0
    assert entry.weights_sha256 == sha256_of(tiny_model_dir / WEIGHTS_FILE)
    assert entry.labels()["weights"] == "random-init"
    with (tiny_model_dir / WEIGHTS_FILE).open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    assert "visual.conv1.weight" in header  # safetensors with open_clip's state-dict keys


def test_random_init_is_deterministic(tmp_path: Path) -> None:
    import open_clip

    from tests.conftest import FIXTURES, TINY

    open_clip.add_model_config(FIXTURES / f"{TINY}.json")
    first = save_random_init(tmp_path / "a", TINY, seed=7)
    second = save_random_init(tmp_path / "b", TINY, seed=7)
    other = save_random_init(tmp_path / "c", TINY, seed=8)
    assert first.weights_sha256 == second.weights_sha256 != other.weights_sha256


def test_tampered_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "entry"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="does not match"):
        verify_weights(copy, read_entry(copy))
    with pytest.raises(ModelStoreError, match="does not match"):
        ClipModel("x", copy, torch_plan(torch.device("cpu")), LIMITS, 0)


def test_missing_or_malformed_entries(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="missing"):
        read_entry(tmp_path)
    copy = tmp_path / "entry"
    shutil.copytree(tiny_model_dir, copy)
    (copy / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelStoreError, match="missing"):
        verify_weights(copy, read_entry(copy))
    (copy / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelStoreError, match="malformed"):
        read_entry(copy)


def test_entries_saved_before_the_weights_rename_still_read(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Format version 1 called ``weights`` ``weights_source``: such stores keep serving."""
    copy = tmp_path / "entry"
    shutil.copytree(tiny_model_dir, copy)
    current = json.loads((copy / METADATA_FILE).read_text())
    version_1 = {**current, "weights_source": current["weights"], "format_version": 1}
    del version_1["weights"]
    (copy / METADATA_FILE).write_text(json.dumps(version_1))
    assert read_entry(copy) == read_entry(tiny_model_dir)
    (copy / METADATA_FILE).write_text(json.dumps({**current, "format_version": 3}))
    with pytest.raises(ModelStoreError, match="format version 3"):
        read_entry(copy)


def test_pretrained_offline_fails_fast_and_names_the_options(tmp_path: Path) -> None:
    env = {
        "BENTOML_HOME": str(tmp_path / "home"),
        "PATH": "/usr/bin:/bin",
        "HF_HOME": str(tmp_path / "hf"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.save_models",
            "--models",
            "ViT-B-32",
            "--offline",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert "--random-init" in result.stderr and "--checkpoint" in result.stderr
    # Offline mode was on when open_clip asked the hub, so huggingface did not retry (~46 s).
    assert "no network access to the model hub" in result.stderr
    assert elapsed < 180  # a sanity bound only: imports alone take ~10 s on an idle 2-core box


def test_unreachable_hub_switches_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from clip_runtime import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise httpx.ConnectError("no route")

    monkeypatch.setattr(sources.httpx, "head", unreachable)
    assert sources.ensure_offline_mode_if_unreachable() is True
    assert sources.os.environ["HF_HUB_OFFLINE"] == "1"
