"""The on-disk layout of one saved model (a BentoML model store entry's folder).

The folder is an open_clip ``local-dir`` (``open_clip_config.json`` and
``open_clip_model.safetensors``), so open_clip's own loader builds the model and its preprocessing,
plus ``clip_model.json``: where the weights came from and their sha256, checked before any weight
is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clip_runtime.errors import ModelStoreError
from clip_runtime.registry import store_name

if TYPE_CHECKING:  # the HTTP front end reads entries without importing torch
    import torch

Weights = Literal["pretrained", "checkpoint", "random-init"]
# "clip": softmax over logit_scale * cos; "siglip": sigmoid(logit_scale * cos + logit_bias).
Family = Literal["clip", "siglip"]

METADATA_FILE = "clip_model.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
FORMAT_VERSION = 2
# Version 1 differs only in a field's name: `weights` was `weights_source`.
_RENAMED_SINCE_VERSION_1 = {"weights_source": "weights"}


__all__ = [
    "ModelEntry",
    "embed_dim",
    "family_of",
    "read_entry",
    "store_name",
    "verify_weights",
    "write_entry",
]


def family_of(model: torch.nn.Module) -> Family:
    """SigLIP models carry a learnt ``logit_bias`` (their sigmoid loss); CLIP models do not."""
    return "siglip" if getattr(model, "logit_bias", None) is not None else "clip"


@dataclass(frozen=True)
class ModelEntry:
    """What ``clip_model.json`` records about one saved model."""

    architecture: str
    pretrained: str | None  # the open_clip tag; None for checkpoint and random-init weights
    weights: Weights
    weights_sha256: str
    preprocess_cfg: dict[str, Any]
    preprocess_from: str | None  # the tag whose preprocessing was adopted, if any
    seed: int | None = None
    checkpoint_name: str | None = None
    format_version: int = FORMAT_VERSION
    # Added with the model registry; entries saved before it are CLIP models with open_clip's
    # own tokenizer, which these defaults say.
    name: str | None = None  # the served name it was saved as
    family: Family = "clip"
    tokenizer: str = "open_clip"  # "open_clip" (BPE, in the package) or the HF tokenizer's source

    @property
    def untrained(self) -> bool:
        return self.weights == "random-init"

    def labels(self) -> dict[str, str]:
        """The same facts as BentoML model labels (strings only)."""
        return {
            "architecture": self.architecture,
            "pretrained": self.pretrained or "none",
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "family": self.family,
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_entry(
    folder: Path,
    model: torch.nn.Module,
    *,
    architecture: str,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    pretrained: str | None,
    weights: Weights,
    preprocess_from: str | None = None,
    seed: int | None = None,
    checkpoint_name: str | None = None,
    name: str | None = None,
    family: Family = "clip",
    tokenizer: str = "open_clip",
) -> ModelEntry:
    """Write weights (safetensors, never pickle) and both JSON files into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_FILE
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(weights_path))
    (folder / OPEN_CLIP_CONFIG_FILE).write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    entry = ModelEntry(
        architecture=architecture,
        pretrained=pretrained,
        weights=weights,
        weights_sha256=sha256_of(weights_path),
        preprocess_cfg=preprocess_cfg,
        preprocess_from=preprocess_from,
        seed=seed,
        checkpoint_name=checkpoint_name,
        name=name,
        family=family,
        tokenizer=tokenizer,
    )
    (folder / METADATA_FILE).write_text(json.dumps(asdict(entry), indent=2))
    return entry


def embed_dim(folder: Path) -> int:
    """The embedding size every open_clip config states (CLIP and custom-text towers alike)."""
    return int(json.loads((folder / OPEN_CLIP_CONFIG_FILE).read_text())["model_cfg"]["embed_dim"])


def _upgraded(raw: dict[str, Any]) -> dict[str, Any]:
    """A version 1 entry in today's names, so that stores saved before the rename still serve."""
    if isinstance(raw, dict) and raw.get("format_version") == 1:
        raw = {_RENAMED_SINCE_VERSION_1.get(key, key): value for key, value in raw.items()}
        raw["format_version"] = FORMAT_VERSION
    return raw


def read_entry(folder: Path) -> ModelEntry:
    """Read ``clip_model.json``; cheap (no weights touched)."""
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        raise ModelStoreError(f"{folder} is not a CLIP model entry: {METADATA_FILE} is missing")
    try:
        raw = json.loads(metadata_path.read_text())
        entry = ModelEntry(**_upgraded(raw))
    except (ValueError, TypeError) as exc:
        raise ModelStoreError(f"{metadata_path} is malformed: {exc}") from exc
    if entry.format_version != FORMAT_VERSION:
        raise ModelStoreError(
            f"{metadata_path} has format version {entry.format_version}; "
            f"this build reads version {FORMAT_VERSION}. Save the model again."
        )
    return entry


def verify_weights(folder: Path, entry: ModelEntry) -> None:
    """Refuse weights whose sha256 differs from the one recorded when they were saved."""
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelStoreError(f"{folder}: weights file {WEIGHTS_FILE} is missing")
    actual = sha256_of(weights_path)
    if actual != entry.weights_sha256:
        raise ModelStoreError(
            f"{weights_path}: sha256 {actual} does not match the recorded "
            f"{entry.weights_sha256}; the entry is corrupt or was modified. Save the model again."
        )
