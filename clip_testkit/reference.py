"""open_clip's own end-to-end computation, the yardstick every score is checked against."""

from __future__ import annotations

import io
from pathlib import Path

import open_clip
import torch
from PIL import Image


def reference_cosines(folder: Path, images: list[bytes], texts: list[str]) -> list[float]:
    """open_clip its own way on a saved entry: its transform, tokenizer, normalize=True, fp32."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(data))) for data in images])
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
    return (image_features * text_features).sum(-1).tolist()
