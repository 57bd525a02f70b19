"""Which models can be saved and served, and the names each one goes by.

The registry is data: the model store. A served model's name is the spec it was saved from
(``scripts/save_models.py --models SPEC``), and everything else is derived from that name:

- ``ViT-B-32``, ``ViT-L-14``: the documented pair, with their default pretrained tags;
- ``ARCH:TAG``: any open_clip architecture with one of its pretrained tags
  (``ViT-SO400M-14-SigLIP-384:webli``, ``EVA02-L-14:merged2b_s4b_b131k``);
- ``hf-hub:ORG/NAME``: an open_clip model published on the Hugging Face Hub;
- ``ARCH`` alone: an architecture with local weights (``--checkpoint``) or random-init ones.

``store_name`` and ``api_suffix`` are pure functions of the served name, so the service can name
its store references and per-model APIs at import time, before any model is read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from clip_runtime.errors import WeightsUnavailableError

# The documented pair, served by default.
DEFAULT_MODELS: tuple[str, ...] = ("ViT-B-32", "ViT-L-14")

# The tag each architecture is saved with unless told otherwise; its preprocessing is also the one
# adopted for checkpoint and random-init weights, so a demo behaves like the real deployment.
DEFAULT_TAGS: dict[str, str] = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-L-14": "laion2b_s32b_b82k",
}

HF_HUB_PREFIX = "hf-hub:"
STORE_PREFIX = "clip-"
_STORE_NAME_MAX = 63  # BentoML's limit on a tag's name


def store_name(name: str) -> str:
    """The model store name of a served model: ``ViT-B-32`` -> ``clip-vit-b-32``,
    ``ViT-SO400M-14-SigLIP-384:webli`` -> ``clip-vit-so400m-14-siglip-384-webli``.

    Lower-case letters, digits and single dashes only (a valid BentoML name); a name longer than
    BentoML allows keeps its start and gets a digest of the whole name, so it stays unique."""
    candidate = STORE_PREFIX + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if len(candidate) <= _STORE_NAME_MAX:
        return candidate
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{candidate[: _STORE_NAME_MAX - 9].rstrip('-')}-{digest}"


def api_suffix(name: str) -> str:
    """A Python identifier unique per store name, for the per-model BentoML API and attribute:
    ``ViT-B-32`` -> ``clip_vit_b_32`` (the API is ``score_clip_vit_b_32``)."""
    return store_name(name).replace("-", "_")


@dataclass(frozen=True)
class ModelSpec:
    """What one served name asks to be saved."""

    name: str  # the served name
    architecture: str  # an open_clip architecture, or ``hf-hub:ORG/NAME``
    tag: str | None  # the pretrained tag; None for hub models and architectures alone

    @property
    def is_hub(self) -> bool:
        return self.architecture.startswith(HF_HUB_PREFIX)


def parse_spec(spec: str, pretrained: str | None = None) -> ModelSpec:
    """Split ``ARCH[:TAG]`` or ``hf-hub:ORG/NAME``. ``pretrained`` (``--pretrained``) overrides the
    default tag of a short name, which keeps its served name (``ViT-B-32`` with ``openai``)."""
    spec = spec.strip()
    if not spec:
        raise WeightsUnavailableError("empty model spec")
    if spec.startswith(HF_HUB_PREFIX):
        if pretrained:
            raise WeightsUnavailableError(f"{spec} is a hub model: it takes no --pretrained tag")
        if not spec.removeprefix(HF_HUB_PREFIX).strip("/"):
            raise WeightsUnavailableError(f"{spec!r} names no hub repository (hf-hub:ORG/NAME)")
        return ModelSpec(name=spec, architecture=spec, tag=None)
    architecture, _, tag = spec.partition(":")
    if tag:
        if pretrained and pretrained != tag:
            raise WeightsUnavailableError(f"{spec} already names tag {tag!r}; drop --pretrained")
        return ModelSpec(name=spec, architecture=architecture, tag=tag)
    return ModelSpec(
        name=spec, architecture=architecture, tag=pretrained or DEFAULT_TAGS.get(architecture)
    )


def check_architecture(architecture: str) -> None:
    """Refuse an architecture open_clip does not know, listing the ones it does."""
    import open_clip

    known = open_clip.list_models()
    if architecture not in known:
        raise WeightsUnavailableError(
            f"unknown open_clip architecture {architecture!r}; valid architectures: "
            + ", ".join(known)
        )


def check_tag(architecture: str, tag: str) -> None:
    """Refuse a pretrained tag the architecture does not have, listing the ones it has."""
    import open_clip

    check_architecture(architecture)
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if tag not in tags:
        valid = ", ".join(tags) if tags else "none (save it with --checkpoint or --random-init)"
        raise WeightsUnavailableError(
            f"{architecture} has no pretrained tag {tag!r}; valid tags: {valid}"
        )
