"""Deterministic test images (no files shipped, nothing fetched)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def photo_like(seed: int, width: int = 640, height: int = 480) -> Image.Image:
    """Smooth colour waves plus noise: compresses like a photo (~100 KB JPEG at 640x480)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    waves = np.stack(
        [np.sin(xx / (20 + 10 * c) + seed) * np.cos(yy / (15 + 7 * c)) for c in range(3)], -1
    )
    pixels = ((waves + 1) * 100 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, width: int = 640, height: int = 480) -> bytes:
    return encode(photo_like(seed, width, height), "JPEG", quality=90)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
