"""The served models as BentoML store references: class attributes of both services, so that
`bentoml serve` resolves each served model and `bentoml build` bundles exactly those."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

from clip_runtime import errors as E
from clip_runtime.registry import api_suffix, store_name
from clip_runtime.settings import ClipSettings


def store_attribute(model: str) -> str:
    """The class attribute holding ``model``'s store reference (a Python identifier)."""
    return api_suffix(model)


def batch_api_name(model: str) -> str:
    """The model worker's batchable API for ``model`` (BentoML names APIs by function name)."""
    return "score_" + store_attribute(model)


def _not_saved(name: str, reference: bentoml.models.BentoModel) -> E.ModelStoreError:
    return E.ModelStoreError(
        f"model {name} ({reference.tag}) is not in the BentoML model store (BENTOML_HOME). "
        f"Save it with `python -m scripts.save_models --models {name}` (or add --random-init "
        "for an offline demo), or serve fewer models with CLIP_MODELS."
    )


def add_store_references(cls: type, settings: ClipSettings) -> None:
    """One store reference per served model on ``cls``; checked at import, so that `serve`
    names the fix instead of trying to pull a missing model from BentoCloud."""
    for name in settings.models:
        reference = bentoml.models.BentoModel(store_name(name))
        if reference.stored is None:
            raise _not_saved(name, reference)
        setattr(cls, store_attribute(name), reference)


def model_folders(owner: Any, settings: ClipSettings) -> dict[str, Path]:
    """Store folders of the served models, read through ``owner``'s references."""
    return stored_folders(type(owner), settings)


def stored_folders(cls: type, settings: ClipSettings) -> dict[str, Path]:
    """Store folders of the served models, from ``cls``'s references (``add_store_references``),
    read from the store without resolving them (resolving a missing one would try BentoCloud)."""
    folders: dict[str, Path] = {}
    for name in settings.models:
        reference = cls.__dict__[store_attribute(name)]
        if reference.stored is None:
            raise _not_saved(name, reference)
        folders[name] = Path(reference.stored.path)
    return folders
