"""The service's JSON items, built in one place: what the remote engine and ``--compare-modes``
send (images as base64, so local files and fetched URLs travel the same way)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any


def encode_image(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def batch_item(image: bytes, text: str, references: Sequence[str] | None = None) -> dict[str, Any]:
    """One ``{"image", "text"[, "references"]}`` item of the single and batch endpoints."""
    item: dict[str, Any] = {"image": encode_image(image), "text": text}
    if references:
        item["references"] = list(references)
    return item
