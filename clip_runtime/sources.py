"""Build an open_clip model from one of its weight sources and write it as a model entry, with the
tokenizer files it needs, so that serving it never touches the network.

Used by ``scripts/save_models.py`` (inside a BentoML store entry) and by tests (a temp folder).
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from pathlib import Path
from typing import Any, cast

import httpx
import torch

from clip_runtime.errors import WeightsUnavailableError
from clip_runtime.model_entry import ModelEntry, family_of, write_entry
from clip_runtime.registry import (
    DEFAULT_TAGS,
    HF_HUB_PREFIX,
    ModelSpec,
    check_architecture,
    check_tag,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TAGS", "save_checkpoint", "save_hub", "save_pretrained", "save_random_init"]

HUB_URL = "https://huggingface.co"
OFFLINE_HELP = (
    "Offline options: --checkpoint PATH (a local open_clip checkpoint), "
    "--random-init --seed N (untrained weights, for tests and demos; `make serve-demo`), "
    "or a Hugging Face cache that already holds the weights (HF_HUB_OFFLINE=1, HF_HOME)."
)
TOKENIZER_HELP = (
    "Offline: pass --tokenizer DIR (a tokenizer folder written by save_pretrained), "
    "or a Hugging Face cache that already holds it (HF_HUB_OFFLINE=1, HF_HOME)."
)


def ensure_offline_mode_if_unreachable(timeout_s: float = 3.0) -> bool:
    """Set ``HF_HUB_OFFLINE=1`` when the hub cannot be reached, so huggingface fails at once
    instead of retrying (docs/operations.md). Must run before huggingface_hub is imported (it
    reads the variable at import). Returns True when offline mode is on."""
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

    # open_clip sets these as plain attributes of the tower, which torch's Module.__getattr__
    # types as Tensor | Module.
    visual = cast(Any, model.visual)
    cfg: dict[str, Any] = deepcopy(visual.preprocess_cfg)
    if tag is not None:
        check_tag(architecture, tag)
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(architecture, tag))
        cfg["size"] = visual.image_size  # the tag cannot change the architecture's size
    return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}


def _model_cfg(architecture: str, tag: str | None) -> dict[str, Any]:
    import open_clip

    check_architecture(architecture)
    cfg = open_clip.get_model_config(architecture)
    tag_cfg = open_clip.get_pretrained_cfg(architecture, tag) if tag else {}
    if tag_cfg.get("quick_gelu"):
        cfg["quick_gelu"] = True  # e.g. the `openai` tags were trained with QuickGELU
    return cfg


def _fetch_tokenizer(model_cfg: dict[str, Any], name: str, tokenizer_dir: Path | None) -> Any:
    """The Hugging Face tokenizer a config names (``text_cfg.hf_tokenizer_name``), from
    ``tokenizer_dir`` when given, else from the hub; None for open_clip's own BPE tokenizer (in the
    package). Fetched before any weight is written, so a missing tokenizer fails the save at once.
    """
    text_cfg = model_cfg.get("text_cfg", {})
    source = text_cfg.get("hf_tokenizer_name")
    if not source:
        if tokenizer_dir is not None:
            raise WeightsUnavailableError(
                f"{name} uses open_clip's own tokenizer: --tokenizer does not apply"
            )
        return None
    try:
        from open_clip.tokenizer import HFTokenizer
    except ImportError as exc:
        raise WeightsUnavailableError(f"open_clip's HFTokenizer cannot be imported: {exc}") from exc
    try:
        import transformers  # noqa: F401  (HFTokenizer imports it lazily)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"{name} uses the Hugging Face tokenizer {source!r}: install transformers "
            "(pip install -e '.[hf]')"
        ) from exc
    try:
        return HFTokenizer(
            str(tokenizer_dir) if tokenizer_dir is not None else source,
            context_length=text_cfg.get("context_length"),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    except (OSError, ValueError) as exc:  # transformers' "can't load" errors
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = str(tokenizer_dir) if tokenizer_dir is not None else source
        reason = "no network access to the model hub" if offline else str(exc).splitlines()[0]
        raise WeightsUnavailableError(
            f"Cannot get the tokenizer of {name} from {where}: {reason}. {TOKENIZER_HELP}"
        ) from exc


def _write(
    folder: Path,
    model: torch.nn.Module,
    *,
    name: str,
    architecture: str,
    model_cfg: dict[str, Any],
    preprocess_cfg: dict[str, Any],
    tokenizer: Any,
    **facts: Any,
) -> ModelEntry:
    """Write the entry, and the tokenizer's files beside the weights (open_clip's local-dir
    loader reads an HF tokenizer from the entry's own folder)."""
    entry = write_entry(
        folder,
        model,
        architecture=architecture,
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        name=name,
        family=family_of(model),
        tokenizer="open_clip" if tokenizer is None else model_cfg["text_cfg"]["hf_tokenizer_name"],
        **facts,
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return entry


def save_random_init(
    folder: Path,
    architecture: str,
    seed: int,
    *,
    tag: str | None = None,
    name: str | None = None,
    tokenizer_dir: Path | None = None,
) -> ModelEntry:
    """Deterministic untrained weights: offline, for tests and demos. Flagged everywhere. The
    preprocessing is ``tag``'s (default: the architecture's default tag)."""
    import open_clip

    preprocess_tag = tag or DEFAULT_TAGS.get(architecture)
    model_cfg = _model_cfg(architecture, preprocess_tag)
    name = name or architecture
    tokenizer = _fetch_tokenizer(model_cfg, name, tokenizer_dir)
    torch.manual_seed(seed)
    model = open_clip.create_model(architecture, pretrained=None, pretrained_text=False)
    return _write(
        folder,
        model,
        name=name,
        architecture=architecture,
        model_cfg=model_cfg,
        preprocess_cfg=_preprocess_cfg(model, architecture, preprocess_tag),
        tokenizer=tokenizer,
        pretrained=None,
        weights="random-init",
        preprocess_from=preprocess_tag,
        seed=seed,
    )


def save_pretrained(
    folder: Path,
    architecture: str,
    tag: str,
    *,
    name: str | None = None,
    tokenizer_dir: Path | None = None,
) -> ModelEntry:
    """Download (or take from the HF cache) the weights of an open_clip pretrained tag."""
    import open_clip

    check_tag(architecture, tag)
    model_cfg = _model_cfg(architecture, tag)
    name = name or f"{architecture}:{tag}"
    # The tokenizer is the likelier failure offline and is small: fail on it before the weights.
    tokenizer = _fetch_tokenizer(model_cfg, name, tokenizer_dir)
    try:
        model = open_clip.create_model(architecture, pretrained=tag)
    except Exception as exc:  # open_clip wraps every download failure in RuntimeError
        raise _download_error(f"{architecture}/{tag}", exc) from exc
    return _write(
        folder,
        model,
        name=name,
        architecture=architecture,
        model_cfg=model_cfg,
        preprocess_cfg=_preprocess_cfg(model, architecture, tag),
        tokenizer=tokenizer,
        pretrained=tag,
        weights="pretrained",
        preprocess_from=tag,
    )


def save_hub(folder: Path, hub_name: str, *, tokenizer_dir: Path | None = None) -> ModelEntry:
    """An open_clip model published on the Hugging Face Hub (``hf-hub:ORG/NAME``): its
    ``open_clip_config.json`` (architecture and preprocessing) and weights."""
    import json

    import open_clip
    from huggingface_hub import hf_hub_download

    repo = hub_name.removeprefix(HF_HUB_PREFIX)
    try:
        config = json.loads(Path(hf_hub_download(repo, "open_clip_config.json")).read_text())
        model = open_clip.create_model(hub_name)
    except Exception as exc:  # hub and open_clip errors alike: report and stop
        raise _download_error(hub_name, exc) from exc
    model_cfg = config["model_cfg"]
    tokenizer = _fetch_tokenizer(model_cfg, hub_name, tokenizer_dir)
    preprocess_cfg = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in model.visual.preprocess_cfg.items()
    }
    return _write(
        folder,
        model,
        name=hub_name,
        architecture=hub_name,
        model_cfg=model_cfg,
        preprocess_cfg=preprocess_cfg,
        tokenizer=tokenizer,
        pretrained=hub_name,
        weights="pretrained",
        preprocess_from=hub_name,
    )


def save_checkpoint(
    folder: Path,
    architecture: str,
    checkpoint: Path,
    preprocess_tag: str | None,
    *,
    name: str | None = None,
    tokenizer_dir: Path | None = None,
) -> ModelEntry:
    """A local open_clip checkpoint (safetensors or a torch state dict, loaded weights-only). A
    custom architecture is registered first from its config (``open_clip.add_model_config``)."""
    import open_clip

    if not checkpoint.is_file():
        raise WeightsUnavailableError(f"checkpoint {checkpoint} does not exist")
    model_cfg = _model_cfg(architecture, preprocess_tag)
    name = name or architecture
    tokenizer = _fetch_tokenizer(model_cfg, name, tokenizer_dir)
    model = open_clip.create_model(architecture, pretrained=None, pretrained_text=False)
    open_clip.load_checkpoint(model, str(checkpoint), weights_only=True)
    return _write(
        folder,
        model,
        name=name,
        architecture=architecture,
        model_cfg=model_cfg,
        preprocess_cfg=_preprocess_cfg(model, architecture, preprocess_tag),
        tokenizer=tokenizer,
        pretrained=None,
        weights="checkpoint",
        preprocess_from=preprocess_tag,
        checkpoint_name=checkpoint.name,
    )


def save_spec(
    folder: Path,
    spec: ModelSpec,
    *,
    random_init: bool = False,
    seed: int = 0,
    checkpoint: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> ModelEntry:
    """Save what a served name asks for, from the source the flags choose."""
    if spec.is_hub:
        if random_init or checkpoint:
            raise WeightsUnavailableError(f"{spec.name}: a hub model is saved from the hub only")
        return save_hub(folder, spec.architecture, tokenizer_dir=tokenizer_dir)
    if random_init:
        return save_random_init(
            folder,
            spec.architecture,
            seed,
            tag=spec.tag,
            name=spec.name,
            tokenizer_dir=tokenizer_dir,
        )
    if checkpoint is not None:
        return save_checkpoint(
            folder,
            spec.architecture,
            checkpoint,
            spec.tag,
            name=spec.name,
            tokenizer_dir=tokenizer_dir,
        )
    if spec.tag is None:
        import open_clip

        check_architecture(spec.architecture)
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec.architecture)) or "none"
        raise WeightsUnavailableError(
            f"{spec.name}: name a pretrained tag as {spec.architecture}:TAG (valid tags: {tags}), "
            "or use --checkpoint / --random-init"
        )
    return save_pretrained(
        folder, spec.architecture, spec.tag, name=spec.name, tokenizer_dir=tokenizer_dir
    )


def _download_error(what: str, exc: Exception) -> WeightsUnavailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    reason = "no network access to the model hub" if offline else f"download failed: {exc}"
    return WeightsUnavailableError(
        f"Cannot get pretrained weights {what}: {reason}. {OFFLINE_HELP}"
    )
