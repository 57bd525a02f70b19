"""Build an open_clip model from one of the three weight sources and write it as a model entry.

Used by ``scripts/save_models.py`` (inside a BentoML store entry) and by tests (a temp folder).
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from pathlib import Path
from typing import Any

import httpx
import torch

from clip_runtime.errors import WeightsUnavailableError
from clip_runtime.model_entry import ModelEntry, write_entry

logger = logging.getLogger(__name__)

# The tag each architecture is saved with unless told otherwise; its preprocessing is also the one
# adopted for checkpoint and random-init weights, so a demo behaves like the real deployment.
DEFAULT_TAGS: dict[str, str] = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-L-14": "laion2b_s32b_b82k",
}

HUB_URL = "https://huggingface.co"
OFFLINE_HELP = (
    "Offline options: --checkpoint PATH (a local open_clip checkpoint), "
    "--random-init --seed N (untrained weights, for tests and demos; `make serve-demo`), "
    "or a Hugging Face cache that already holds the weights (HF_HUB_OFFLINE=1, HF_HOME)."
)


def ensure_offline_mode_if_unreachable(timeout_s: float = 3.0) -> bool:
    """Set ``HF_HUB_OFFLINE=1`` when the hub cannot be reached, so huggingface fails at once
    instead of retrying for ~46 s. Must run before huggingface_hub is imported (it reads the
    variable at import). Returns True when offline mode is on."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        httpx.head(HUB_URL, timeout=timeout_s)  # honours HTTPS_PROXY like huggingface does
    except httpx.HTTPError as exc:
        logger.warning("Hugging Face Hub unreachable (%s): setting HF_HUB_OFFLINE=1", exc)
        os.environ["HF_HUB_OFFLINE"] = "1"
        return True
    return False


def _preprocess_cfg(model: torch.nn.Module, architecture: str, tag: str | None) -> dict[str, Any]:
    """The model's final preprocessing, taking mean/std/resize from ``tag`` when given."""
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    cfg = deepcopy(model.visual.preprocess_cfg)
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(architecture, tag)
        if not tag_cfg:
            known = open_clip.list_pretrained_tags_by_model(architecture)
            raise WeightsUnavailableError(
                f"{architecture} has no pretrained tag {tag!r}; known tags: {known}"
            )
        cfg = merge_preprocess_dict(cfg, tag_cfg)
        cfg["size"] = model.visual.image_size  # the tag cannot change the architecture's size
    return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}


def _model_cfg(architecture: str, tag: str | None) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_model_config(architecture)
    if cfg is None:
        raise WeightsUnavailableError(
            f"unknown open_clip architecture {architecture!r}; see open_clip.list_models()"
        )
    tag_cfg = open_clip.get_pretrained_cfg(architecture, tag) if tag else {}
    if tag_cfg.get("quick_gelu"):
        cfg["quick_gelu"] = True  # e.g. the `openai` tags were trained with QuickGELU
    return cfg


def save_random_init(folder: Path, architecture: str, seed: int) -> ModelEntry:
    """Deterministic untrained weights: offline, for tests and demos. Flagged everywhere."""
    import open_clip

    preprocess_tag = DEFAULT_TAGS.get(architecture)
    torch.manual_seed(seed)
    model = open_clip.create_model(architecture, pretrained=None, pretrained_text=False)
    return write_entry(
        folder,
        model,
        architecture=architecture,
        model_cfg=_model_cfg(architecture, preprocess_tag),
        preprocess_cfg=_preprocess_cfg(model, architecture, preprocess_tag),
        pretrained=None,
        weights_source="random-init",
        preprocess_from=preprocess_tag,
        seed=seed,
    )


def save_pretrained(folder: Path, architecture: str, tag: str) -> ModelEntry:
    """Download (or take from the HF cache) the weights of an open_clip pretrained tag."""
    import open_clip

    if not open_clip.get_pretrained_cfg(architecture, tag):
        known = open_clip.list_pretrained_tags_by_model(architecture)
        raise WeightsUnavailableError(
            f"{architecture} has no pretrained tag {tag!r}; known: {known}"
        )
    try:
        model = open_clip.create_model(architecture, pretrained=tag)
    except Exception as exc:  # open_clip wraps every download failure in RuntimeError
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        reason = "no network access to the model hub" if offline else f"download failed: {exc}"
        raise WeightsUnavailableError(
            f"Cannot get pretrained weights {architecture}/{tag}: {reason}. {OFFLINE_HELP}"
        ) from exc
    return write_entry(
        folder,
        model,
        architecture=architecture,
        model_cfg=_model_cfg(architecture, tag),
        preprocess_cfg=_preprocess_cfg(model, architecture, tag),
        pretrained=tag,
        weights_source="pretrained",
        preprocess_from=tag,
    )


def save_checkpoint(
    folder: Path, architecture: str, checkpoint: Path, preprocess_tag: str | None
) -> ModelEntry:
    """A local open_clip checkpoint (safetensors or a torch state dict, loaded weights-only)."""
    import open_clip

    if not checkpoint.is_file():
        raise WeightsUnavailableError(f"checkpoint {checkpoint} does not exist")
    model = open_clip.create_model(architecture, pretrained=None, pretrained_text=False)
    open_clip.load_checkpoint(model, str(checkpoint), weights_only=True)
    return write_entry(
        folder,
        model,
        architecture=architecture,
        model_cfg=_model_cfg(architecture, preprocess_tag),
        preprocess_cfg=_preprocess_cfg(model, architecture, preprocess_tag),
        pretrained=None,
        weights_source="checkpoint",
        preprocess_from=preprocess_tag,
        checkpoint_name=checkpoint.name,
    )
