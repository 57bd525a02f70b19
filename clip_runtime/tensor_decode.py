"""JPEG decode and open_clip's eval preprocessing as batched torch ops: the GPU hot path.

On CUDA, ``torchvision.io.decode_jpeg(..., device="cuda")`` decodes a whole batch with nvjpeg
and resize / centre crop / normalize run on the GPU, so the CPU only parses headers. The same
code runs on CPU tensors (libjpeg-turbo decode, torch bicubic resize), which is how the suite
checks it against the PIL path without a GPU.

It reproduces open_clip's ``Resize(shortest side, bicubic, antialias) -> CenterCrop -> ToTensor
-> Normalize`` with torch's resampling instead of Pillow's, in Pillow's order (horizontal pass,
uint8, vertical pass, uint8). Pillow's fixed-point filter and torch's float one still round a
few values differently, by one level (docs/performance.md); ``tests/test_tensor_decode.py``
bounds the difference (pixels and the cosines they cause). Anything this path does not handle
exactly like the PIL path (not a baseline-decodable JPEG, CMYK, an EXIF rotation, a limit
violated) is reported as unsupported, and the caller falls back to the PIL path, which also
produces the proper error.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from clip_runtime.decode_placement import (
    TensorDecodeMode,
    decodes_like_pillow,
    device_decode_enabled,
    handles_preprocessing,
)
from clip_runtime.image_inputs import ImageLimits, decodes_reduced
from clip_runtime.jpeg_markers import jpeg_scan_count

__all__ = [
    "SideStream",
    "TensorDecodeMode",
    "TensorPreprocessor",
    "decodes_like_pillow",
    "handles_preprocessing",
    "tensor_decode_enabled",
]

logger = logging.getLogger(__name__)

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def tensor_decode_enabled(mode: TensorDecodeMode, device: torch.device) -> bool:
    """``auto``: only on CUDA (``decode_placement.device_decode_enabled``)."""
    return device_decode_enabled(mode, device.type)


class SideStream:
    """Device work queued on a CUDA stream of its own, so that it overlaps the model's work on the
    default stream; ``handoff``/``receive`` order the two. On CPU every method is a no-op."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def producing(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def handoff(self) -> torch.cuda.Event | None:
        """Marks the end of the work queued so far (call inside ``producing``)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def receive(self, event: torch.cuda.Event | None, tensors: list[torch.Tensor]) -> None:
        """The current stream waits for ``event``; the allocator is told the tensors are used
        there, so their memory is not reused while that stream still reads it."""
        if self.stream is None or event is None:
            return
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_event(event)
        for tensor in tensors:
            tensor.record_stream(current)


def _by_shape(images: list[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Indices of the images, grouped by shape (each group resizes as one batch)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return groups


class TensorPreprocessor:
    """Encoded JPEGs -> the model's normalized NCHW float32 input, batched on ``device``."""

    def __init__(
        self, preprocess_cfg: dict[str, Any], limits: ImageLimits, device: torch.device
    ) -> None:
        if not handles_preprocessing(preprocess_cfg):
            raise ValueError(f"tensor decode supports resize_mode 'shortest': {preprocess_cfg}")
        size = preprocess_cfg["size"]
        self.size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = _INTERPOLATION[preprocess_cfg.get("interpolation", "bicubic")]
        self.limits = limits
        self.device = device

    def supports(self, data: bytes) -> bool:
        """True when this path decodes ``data`` as the PIL path would (header only, no pixels)."""
        if len(data) > self.limits.max_image_bytes or not data.startswith(b"\xff\xd8"):
            return False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = Image.open(io.BytesIO(data))
        except Exception:  # let the PIL path name the problem
            return False
        width, height = image.size
        return (
            width * height <= self.limits.max_image_pixels
            and min(width, height) >= self.limits.min_image_side
            and max(width, height) <= self.limits.max_aspect_ratio * min(width, height)
            and jpeg_scan_count(data, self.limits.max_jpeg_scans) <= self.limits.max_jpeg_scans
            # The PIL path decodes these at a reduced DCT scale, which this path does not;
            # their full-size downscale also passes the factor (~11) past which CUDA's
            # antialiased bicubic kernel runs out of shared memory and raises.
            and not decodes_reduced((width, height), max(self.size))
            and decodes_like_pillow(image)
        )

    def decode(self, images: list[bytes]) -> list[torch.Tensor]:
        """CHW uint8 RGB on ``device``: one nvjpeg call for the whole list on CUDA."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 flags its image IO as deprecated
            if self.device.type == "cuda":
                return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device))
            return [decode_jpeg(item, mode=ImageReadMode.RGB) for item in raw]

    def decode_each(
        self, images: list[bytes], pool: ThreadPoolExecutor | None = None
    ) -> list[torch.Tensor | None]:
        """``decode``, with None for an image it cannot decode (the caller retries it with PIL,
        which names the error). nvjpeg fails a whole batch for one bad image, hence the retry one
        by one, on CUDA in this thread: its CUDA stream (``SideStream.producing``) is current
        here only, and decodes made on another thread's stream would not be ordered before the
        resize that reads them. libjpeg decodes (CPU) run in ``pool`` (it releases the GIL).
        An empty list decodes to nothing: torchvision's batched nvjpeg call refuses one."""
        if not images:
            return []
        if self.device.type == "cuda":
            try:
                return list(self.decode(images))
            except RuntimeError:
                pool = None

        def one(data: bytes) -> torch.Tensor | None:
            try:
                return self.decode([data])[0]
            except RuntimeError:
                return None

        return list(pool.map(one, images)) if pool is not None else [one(d) for d in images]

    def crop(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        """Resize (shortest side) + centre crop, NCHW uint8; images of one size resize together."""
        out = torch.empty((len(decoded), 3, *self.size), dtype=torch.uint8, device=self.device)
        for indices in _by_shape(decoded).values():
            out[indices] = self._crop_group([decoded[i] for i in indices])
        return out

    def crop_each(self, decoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """``crop``, one row per image, with None for the images whose resize failed (a device
        kernel's limit, memory): the caller retries those with PIL, as for a failed decode,
        instead of failing the whole batch."""
        rows: list[torch.Tensor | None] = [None] * len(decoded)
        for indices in _by_shape(decoded).values():
            try:
                group = self._crop_group([decoded[i] for i in indices])
            except RuntimeError:
                logger.warning(
                    "device resize failed for %s; using PIL",
                    tuple(decoded[indices[0]].shape),
                    exc_info=True,
                )
                continue
            for i, row in zip(indices, group, strict=True):
                rows[i] = row
        return rows

    def _crop_group(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(images).to(torch.float32)
        resized = self._resize_like_pillow(batch)
        return TF.center_crop(resized, list(self.size)).to(torch.uint8)

    def _resize_like_pillow(self, batch: torch.Tensor) -> torch.Tensor:
        """open_clip's Resize (shortest side to the crop's smaller side, torchvision's size rule)
        done as Pillow does it: the horizontal pass, rounded to uint8 levels, then the vertical
        one, rounded again. One 2-D pass in float instead left many values a level or two off
        Pillow's; this way few differ, by one level (docs/performance.md)."""
        height, width = batch.shape[-2:]
        short = min(self.size)
        if height <= width:
            new_height, new_width = short, int(short * width / height)
        else:
            new_height, new_width = int(short * height / width), short
        for size in ([height, new_width], [new_height, new_width]):
            if list(batch.shape[-2:]) != size:
                batch = TF.resize(batch, size, interpolation=self.interpolation, antialias=True)
                batch = batch.round_().clamp_(0, 255)
        return batch
