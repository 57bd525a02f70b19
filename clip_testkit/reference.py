"""open_clip's own end-to-end computation, the yardstick every score is checked against."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image


@functools.lru_cache(maxsize=1)  # consecutive checks on one entry build the model once
def reference_model(folder: Path) -> tuple[Any, Callable[[Image.Image], torch.Tensor], Any]:
    """open_clip's model (eval mode), image transform and tokenizer for a saved entry."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    return model, preprocess, tokenizer


def reference_cosines(folder: Path, images: list[bytes], texts: list[str]) -> list[float]:
    """open_clip its own way on a saved entry: its transform, tokenizer, normalize=True, fp32."""
    model, preprocess, tokenizer = reference_model(folder)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
    return (image_features * text_features).sum(-1).tolist()
