"""Image inputs: the JSON ``image`` field to bytes, bytes to a PIL image (with every limit checked
before the pixels are decoded), and a PIL image to the model's input crop via open_clip's own
transform for the saved tag."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from clip_runtime.errors import (
    ImageDimensionsTooLargeError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidImageError,
    UnsupportedImageFormatError,
)

# The JSON field's decoding lives in a torch-free module (the remote CLI uses it); re-exported.
from clip_runtime.image_field import decode_image_field as decode_image_field
from clip_runtime.image_field import is_url as is_url
from clip_runtime.memory import DecodeBudget

# MPO is the multi-picture JPEG that many cameras write; its first frame is a plain JPEG.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

# Our own pixel limit runs first, from the header; Pillow's bomb check is then redundant and
# would raise for sizes our setting allows.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int
    max_image_pixels: int
    min_image_side: int
    budget: DecodeBudget | None = None  # None: decodes are not counted (CLI, tests)


def decode_cost(image: Image.Image, encoded_bytes: int) -> int:
    """Bytes a decode of ``image`` claims at its peak, from the header alone: the encoded bytes,
    the decoded frame, one 4-byte intermediate (RGBA/L conversion) and the RGB result (Pillow
    stores RGB in 4 bytes a pixel)."""
    pixels = image.size[0] * image.size[1]
    mode = image.mode
    frame = 1 if mode in {"1", "L", "P"} else 2 if mode.startswith("I;16") else 4
    return encoded_bytes + pixels * (frame + 4 + 4)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with alpha composited on white (not dropped to black) and 16-bit depth scaled down."""
    # In the pixels' own width (uint16/int32), not int64: a 40 MP 16-bit frame is 80 MB, and
    # widening it cost 320 MB per temporary.
    if image.mode.startswith("I;16"):
        narrow = (np.asarray(image) >> 8).astype(np.uint8)
        image = Image.fromarray(narrow, mode="L")
    elif image.mode == "I":
        wide = np.asarray(image)
        shift = 8 if wide.max(initial=0) > 255 else 0
        image = Image.fromarray((np.clip(wide, 0, 65535) >> shift).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _known_unsupported_format(data: bytes) -> str | None:
    """Name formats Pillow cannot open but users do send, so the error says what to change."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
            return "HEIC"
        if brand in (b"avif", b"avis"):
            return "AVIF"
    if data.startswith(b"%PDF"):
        return "PDF"
    return None


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode bytes to an upright RGB image, refusing oversized input before full decoding."""
    return decode_pixels(open_header(data, limits))


def open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    """The image with only its header read; every limit that the header can answer checked."""
    if len(data) > limits.max_image_bytes:
        raise ImageTooLargeError(f"image is larger than {limits.max_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF/ICC; we judge by decoding
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        known = _known_unsupported_format(data)
        if known:
            raise UnsupportedImageFormatError(
                f"{known} images are not supported; send one of {sorted(SUPPORTED_FORMATS)}"
            ) from exc
        raise InvalidImageError("image bytes are not a recognised image format") from exc
    except Exception as exc:  # a malformed header can raise almost anything inside a plugin
        raise InvalidImageError(f"image header is unreadable: {exc}") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageFormatError(
            f"{image.format} images are not supported; send one of {sorted(SUPPORTED_FORMATS)}"
        )
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ImageDimensionsTooLargeError(
            f"image is {width}x{height} pixels; at most {limits.max_image_pixels} are accepted"
        )
    if min(width, height) < limits.min_image_side:
        raise ImageTooSmallError(
            f"image is {width}x{height}; both sides must be at least {limits.min_image_side} px"
        )
    return image


def decode_pixels(image: Image.Image) -> Image.Image:
    """The pixels of an image from ``open_header``, as upright RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.seek(0)  # animated GIF/APNG/WebP: the first frame
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright)
    except Exception as exc:  # truncated or corrupt pixel data
        raise InvalidImageError(f"image data cannot be decoded: {exc}") from exc


class ImagePreprocessor:
    """open_clip's evaluation transform for a saved model, split at ``ToTensor``.

    The PIL half (resize keeping aspect ratio, centre crop) runs per image where the request is
    decoded; it yields the crop as uint8, which is exactly what ``ToTensor`` would see. The tensor
    half (scale to [0, 1], normalise with the tag's mean/std) runs on whole batches on the model's
    device, with open_clip's own ``Normalize``.
    """

    def __init__(self, preprocess_cfg: dict[str, Any], limits: ImageLimits) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(**{**preprocess_cfg, "size": _size(preprocess_cfg["size"])})
        steps = list(image_transform_v2(cfg, is_train=False).transforms)
        split = next(i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor))
        normalizers = [
            step for step in steps[split + 1 :] if isinstance(step, transforms.Normalize)
        ]
        if len(steps) != split + 2 or len(normalizers) != 1:
            raise ValueError(f"unexpected open_clip eval transform: {steps}")
        self._pil_steps = transforms.Compose(steps[:split])
        self.normalize: transforms.Normalize = normalizers[0]
        self.limits = limits
        self.size: tuple[int, int] = (
            cfg.size if isinstance(cfg.size, tuple) else (cfg.size, cfg.size)
        )

    def crop(self, image: Image.Image) -> np.ndarray:
        """The model-sized crop of an RGB image, HWC uint8."""
        cropped = self._pil_steps(image)
        array = np.asarray(cropped, dtype=np.uint8)
        if array.shape != (*self.size, 3):
            raise InvalidImageError(f"preprocessing produced shape {array.shape}")
        return array

    def from_bytes(self, data: bytes) -> np.ndarray:
        return self.from_header(open_header(data, self.limits), data)

    def from_header(self, image: Image.Image, data: bytes) -> np.ndarray:
        """The crop of an image opened by ``open_header`` from ``data``."""
        if self.limits.budget is None:
            return self.crop(decode_pixels(image))
        with self.limits.budget.reserve(decode_cost(image, len(data))):
            return self.crop(decode_pixels(image))

    def to_pixels(self, crops: torch.Tensor) -> torch.Tensor:
        """A uint8 NCHW batch of crops (on any device) -> the model's input: ToTensor's
        scaling and the tag's Normalize, in float32, where the batch is."""
        return self.normalize(crops.to(torch.float32).div(255))


def _size(value: int | list[int] | tuple[int, int]) -> int | tuple[int, int]:
    return value if isinstance(value, int) else (int(value[0]), int(value[1]))
