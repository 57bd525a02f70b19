"""Image inputs: the JSON ``image`` field to bytes, bytes to a PIL image (with every limit checked
before the pixels are decoded), and a PIL image to the model's input crop: open_clip's own eval
transform for the saved tag, its PIL half done with Pillow alone (no torch in the front end)."""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_runtime.errors import (
    ImageAspectRatioError,
    ImageDimensionsTooLargeError,
    ImageTooLargeError,
    ImageTooManyScansError,
    ImageTooSmallError,
    InvalidImageError,
    UnsupportedImageFormatError,
)

# The JSON field's decoding lives in a torch-free module (the remote CLI uses it); re-exported.
from clip_runtime.image_field import decode_image_field as decode_image_field
from clip_runtime.image_field import is_url as is_url
from clip_runtime.jpeg_markers import jpeg_scan_count
from clip_runtime.memory import DecodeBudget, Reservation
from clip_runtime.settings import DEFAULT_MAX_IMAGE_ASPECT_RATIO, DEFAULT_MAX_JPEG_SCANS

if TYPE_CHECKING:  # torch and torchvision are imported where used: the front end never loads them
    import torch
    from torchvision import transforms

# MPO is the multi-picture JPEG that many cameras write; its first frame is a plain JPEG.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

# A JPEG is decoded at a reduced scale only while its shorter side stays at least this many
# times the model's input side: the crop then differs from the full decode's by a few uint8
# levels at most (cosines by < 2e-3; tests/test_memory.py), and a 6000x4000 photo decodes to
# 1500x1000 for a 224 px model (1/16 of the pixels).
DRAFT_MIN_FACTOR = 4

# Our own pixel limit runs first, from the header; Pillow's bomb check is then redundant and
# would raise for sizes our setting allows.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int
    max_image_pixels: int
    min_image_side: int
    max_aspect_ratio: float = DEFAULT_MAX_IMAGE_ASPECT_RATIO
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    budget: DecodeBudget | None = None  # None: decodes are not counted (CLI, tests)


def decodes_reduced(size: tuple[int, int], input_side: int) -> bool:
    """True when a JPEG of ``size`` is decoded at a reduced DCT scale for a model whose input
    side is ``input_side`` (``ImagePreprocessor.draft``): at least one halving keeps its
    shorter side ``DRAFT_MIN_FACTOR`` times the input side."""
    return min(size) >= 2 * DRAFT_MIN_FACTOR * input_side


def decode_cost(image: Image.Image, encoded_bytes: int) -> int:
    """Bytes a decode of ``image`` claims at its peak, from the header alone: the encoded bytes,
    the decoded frame, one 4-byte intermediate (RGBA/L conversion) and the RGB result (Pillow
    stores RGB in 4 bytes a pixel)."""
    pixels = image.size[0] * image.size[1]
    mode = image.mode
    frame = 1 if mode in {"1", "L", "P"} else 2 if mode.startswith("I;16") else 4
    return encoded_bytes + pixels * (frame + 4 + 4)


def resize_cost(size: tuple[int, int], input_side: int) -> int:
    """Bytes the shortest-side resize of an RGB image of ``size`` to ``input_side`` allocates:
    Pillow resamples horizontally into a temporary (new width x old height), then vertically
    into the result (new width x new height), 4 bytes a pixel each."""
    width, height = size
    scale = input_side / min(width, height)
    new_width, new_height = math.ceil(width * scale), math.ceil(height * scale)
    return 4 * new_width * (height + new_height)


def check_aspect_ratio(width: int, height: int, limit: float) -> None:
    """Refuse an image too long and thin to resize: its short side goes to the model's input
    side and its long side with it, so a 4x50000 image resizes to 224x2800000."""
    ratio = max(width, height) / min(width, height)
    if ratio > limit:
        raise ImageAspectRatioError(
            f"image is {width}x{height}: its sides' ratio {ratio:.0f}:1 is over the limit of "
            f"{limit:g}:1 (CLIP_MAX_IMAGE_ASPECT_RATIO); crop it or pad it closer to square"
        )


def check_jpeg_scans(data: bytes, limit: int) -> None:
    """Refuse a JPEG whose scans (each a pass over the whole image) exceed ``limit``."""
    if jpeg_scan_count(data, stop_after=limit) > limit:
        raise ImageTooManyScansError(
            f"JPEG has more than {limit} scans (CLIP_MAX_JPEG_SCANS); re-encode it as a "
            "baseline JPEG or with a standard progressive script"
        )


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
    return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") would copy


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
    check_aspect_ratio(width, height, limits.max_aspect_ratio)
    if image.format in ("JPEG", "MPO"):
        check_jpeg_scans(data, limits.max_jpeg_scans)
    return image


def decode_pixels(image: Image.Image) -> Image.Image:
    """The pixels of an image from ``open_header``, as upright RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.seek(0)  # animated GIF/APNG/WebP: the first frame
            image.load()
            # In place: not in place, it copies the whole frame even when nothing turns.
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image)
    except Exception as exc:  # truncated or corrupt pixel data
        raise InvalidImageError(f"image data cannot be decoded: {exc}") from exc


# The crop fields of open_clip's ``PreprocessCfg`` where an entry leaves them out: its defaults.
# The model worker compares this crop with open_clip's own transform at start
# (``ImagePreprocessor.normalize``), so a change there refuses to start rather than drift.
DEFAULT_INTERPOLATION = "bicubic"
DEFAULT_RESIZE_MODE = "shortest"
DEFAULT_FILL_COLOR = 0
# Small odd-sized noise images on which the model worker checks this crop against open_clip's.
_PARITY_PROBE_SIZES = ((37, 23), (23, 41), (301, 300))


class ImagePreprocessor:
    """open_clip's evaluation transform for a saved model, split at ``ToTensor``.

    The PIL half (resize, centre crop or pad) runs per image where the request is decoded,
    with Pillow alone, exactly as torchvision's transforms call Pillow on PIL images: no torch,
    so the HTTP front end does not load it. It yields the crop as HWC uint8, which is exactly
    what ``ToTensor`` would see. The tensor half (scale to [0, 1], normalize with the tag's
    mean/std) runs on whole batches on the model's device, with open_clip's own ``Normalize``
    (``to_pixels``, on the model worker).
    """

    def __init__(self, preprocess_cfg: dict[str, Any], limits: ImageLimits) -> None:
        self.preprocess_cfg = preprocess_cfg
        size = _size(preprocess_cfg["size"])
        self.size: tuple[int, int] = size if isinstance(size, tuple) else (size, size)
        self.resize_mode: str = preprocess_cfg.get("resize_mode") or DEFAULT_RESIZE_MODE
        if self.resize_mode not in {"shortest", "longest", "squash"}:
            raise ValueError(f"unknown resize_mode in {preprocess_cfg}")
        interpolation = preprocess_cfg.get("interpolation") or DEFAULT_INTERPOLATION
        # open_clip: "bilinear" is bilinear, anything else ("bicubic", "random") bicubic.
        self.resample = (
            Image.Resampling.BILINEAR if interpolation == "bilinear" else Image.Resampling.BICUBIC
        )
        self.fill_color: int = preprocess_cfg.get("fill_color", DEFAULT_FILL_COLOR)
        self.limits = limits

    def _resized(self, image: Image.Image) -> Image.Image:
        """open_clip's resize step: torchvision's ``Resize`` (square crop, "shortest") or
        ``ResizeKeepRatio`` (non-square crop, or "longest"), or a squash to the input size
        (the tags that were trained on squashed images); torchvision hands PIL images to
        ``Image.resize`` with the same filter, which always antialiases."""
        width, height = image.size
        target_h, target_w = self.size
        resample = self.resample
        if self.resize_mode == "squash":
            new_w, new_h = target_w, target_h
        elif self.resize_mode == "shortest" and target_h == target_w:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = target_h, int(target_h * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:  # ResizeKeepRatio: fit the longest side, or (non-square "shortest") the shortest
            ratio_h, ratio_w = height / target_h, width / target_w
            longest = self.resize_mode == "longest"
            ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
            new_h, new_w = round(height / ratio), round(width / ratio)
            if self.resize_mode == "shortest":
                resample = Image.Resampling.BICUBIC  # open_clip builds it without the cfg's
        if (new_w, new_h) == (width, height):
            return image
        return image.resize((new_w, new_h), resample)

    def _center_crop_or_pad(self, image: Image.Image) -> Image.Image:
        """torchvision's ``center_crop`` (open_clip's ``center_crop_or_pad`` with its fill):
        pad a side shorter than the crop, then cut the centre, rounding as they do."""
        crop_h, crop_w = self.size
        width, height = image.size
        if crop_w > width or crop_h > height:
            fill = self.fill_color if self.resize_mode == "longest" else 0
            border = (
                (crop_w - width) // 2 if crop_w > width else 0,
                (crop_h - height) // 2 if crop_h > height else 0,
                (crop_w - width + 1) // 2 if crop_w > width else 0,
                (crop_h - height + 1) // 2 if crop_h > height else 0,
            )
            image = ImageOps.expand(image, border=border, fill=(fill,) * len(image.getbands()))
            width, height = image.size
            if (width, height) == (crop_w, crop_h):
                return image
        top = round((height - crop_h) / 2.0)
        left = round((width - crop_w) / 2.0)
        return image.crop((left, top, left + crop_w, top + crop_h))

    def crop(self, image: Image.Image) -> np.ndarray:
        """The model-sized crop of an image (made RGB first, as ``decode_pixels`` makes it),
        HWC uint8. The aspect ratio is kept unless the tag itself squashes."""
        resized = self._resized(image if image.mode == "RGB" else _to_rgb(image))
        cropped = resized if self.resize_mode == "squash" else self._center_crop_or_pad(resized)
        array = np.asarray(cropped, dtype=np.uint8)
        if array.shape != (*self.size, 3):
            raise InvalidImageError(f"preprocessing produced shape {array.shape}")
        return array

    def draft(self, image: Image.Image) -> Image.Image:
        """Let a JPEG far larger than the model input decode at a reduced DCT scale (1/2, 1/4
        or 1/8; libjpeg's own, before any pixel exists), keeping its shorter side at least
        ``DRAFT_MIN_FACTOR`` times the input side, so the bicubic resize that follows still
        sees plenty of pixels. Other formats cannot decode reduced and are left as they are."""
        if image.format in ("JPEG", "MPO") and decodes_reduced(image.size, max(self.size)):
            floor = DRAFT_MIN_FACTOR * max(self.size)
            image.draft(image.mode, (floor, floor))
        return image

    def from_bytes(self, data: bytes, claim: Reservation | None = None) -> np.ndarray:
        return self.from_header(open_header(data, self.limits), data, claim)

    def from_header(
        self, header: Image.Image, data: bytes, claim: Reservation | None = None
    ) -> np.ndarray:
        """The crop of an image opened by ``open_header`` from ``data``. Its decode is counted
        in the budget: in ``claim`` (held by the caller since the bytes started arriving) or in
        a claim of its own."""
        image = self.draft(header)
        if self.limits.budget is None:
            return self.crop(decode_pixels(image))
        cost = decode_cost(image, len(data)) + resize_cost(image.size, max(self.size))
        if claim is not None:
            claim.grow_to(cost)
            return self.crop(decode_pixels(image))
        with self.limits.budget.reserve(cost):
            return self.crop(decode_pixels(image))

    @functools.cached_property
    def normalize(self) -> transforms.Normalize:
        """open_clip's ``Normalize`` for the tag (its own mean/std, from the saved entry's
        config), built on first use: on the model worker, never in the front end (torch).
        Checks first that open_clip's PIL steps still make this class's crop, and refuses
        (ValueError) when its transform changed shape or result."""
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from torchvision import transforms

        cfg = PreprocessCfg(**{**self.preprocess_cfg, "size": _size(self.preprocess_cfg["size"])})
        steps = list(image_transform_v2(cfg, is_train=False).transforms)
        split = next(i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor))
        normalizers = [
            step for step in steps[split + 1 :] if isinstance(step, transforms.Normalize)
        ]
        if len(steps) != split + 2 or len(normalizers) != 1:
            raise ValueError(f"unexpected open_clip eval transform: {steps}")
        pil_steps = transforms.Compose(steps[:split])
        noise = np.random.default_rng(0)
        for width, height in _PARITY_PROBE_SIZES:
            probe = Image.fromarray(noise.integers(0, 256, (height, width, 3), dtype=np.uint8))
            if not np.array_equal(self.crop(probe), np.asarray(pil_steps(probe))):
                raise ValueError(f"the Pillow crop differs from open_clip's transform: {steps}")
        return normalizers[0]

    def to_pixels(self, crops: torch.Tensor) -> torch.Tensor:
        """A uint8 NCHW batch of crops (on any device) -> the model's input: ToTensor's
        scaling and the tag's Normalize, in float32, where the batch is."""
        import torch

        return self.normalize(crops.to(torch.float32).div(255))


def _size(value: int | list[int] | tuple[int, int]) -> int | tuple[int, int]:
    return value if isinstance(value, int) else (int(value[0]), int(value[1]))
