"""The tensor (GPU-ready) decode path agrees with the PIL path, run on CPU tensors.

Measured on the photo-like 640x480 JPEGs (and two odd sizes): decoded pixels are identical
(same libjpeg-turbo), the resized crops differ by at most 2 uint8 levels (Pillow's fixed-point
bicubic vs torch's float bicubic; ~0.2% of values differ at all), i.e. at most 2/255/std_min
~= 0.029 after normalisation; the cosines differ by < 1e-3. The bounds below leave a little room.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clip_runtime import ClipEngine, ClipSettings, Job
from clip_runtime.errors import EmptyTextError, InvalidImageError
from clip_runtime.images import ImageLimits
from clip_runtime.model import ClipModel
from clip_runtime.tensor_decode import TensorPreprocessor, tensor_decode_enabled
from clip_testkit.images import encode, jpeg_bytes, photo_like

LIMITS = ImageLimits(max_image_bytes=10_000_000, max_image_pixels=50_000_000, min_image_side=4)
CPU = torch.device("cpu")
MAX_UINT8_LEVELS = 2
MAX_COSINE_DIFF = 2e-3
IMAGES = [jpeg_bytes(seed) for seed in range(6)] + [jpeg_bytes(7, 300, 500), jpeg_bytes(8, 97, 61)]
TEXTS = [f"a photo of thing number {i}" for i in range(len(IMAGES))]


def load(folder: Path) -> tuple[ClipModel, TensorPreprocessor]:
    model = ClipModel("test", folder, CPU, torch.float32, LIMITS, 16)
    return model, TensorPreprocessor(model.entry.preprocess_cfg, LIMITS, CPU)


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "b32_model_dir"])
def test_tensor_path_matches_pil_path(model_dir: str, request: pytest.FixtureRequest) -> None:
    model, tensor = load(request.getfixturevalue(model_dir))
    assert all(tensor.supports(data) for data in IMAGES)
    pil_crops = [model.preprocessor.from_bytes(data) for data in IMAGES]
    pil_uint8 = torch.stack([torch.from_numpy(c.copy()).permute(2, 0, 1) for c in pil_crops])
    tensor_uint8 = tensor.crop(tensor.decode(IMAGES))
    levels = (pil_uint8.int() - tensor_uint8.int()).abs().max().item()
    assert levels <= MAX_UINT8_LEVELS

    keep = [False] * len(TEXTS)
    pil_cos = [pair.cosine for pair in model.run(pil_crops, TEXTS, keep)]
    tensor_cos = [pair.cosine for pair in model.run(list(tensor_uint8), TEXTS, keep)]
    np.testing.assert_allclose(tensor_cos, pil_cos, atol=MAX_COSINE_DIFF)


def test_decode_is_identical_to_pillow() -> None:
    cfg = {"size": 64, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    tensor = TensorPreprocessor(cfg, LIMITS, CPU)
    import io

    from PIL import Image

    decoded = tensor.decode(IMAGES[:1])[0].permute(1, 2, 0).numpy()
    expected = np.asarray(Image.open(io.BytesIO(IMAGES[0])).convert("RGB"))
    assert np.array_equal(decoded, expected)


def test_unsupported_inputs_fall_back() -> None:
    tensor = TensorPreprocessor({"size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3}, LIMITS, CPU)
    image = photo_like(3, 80, 60)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: the PIL path applies it, nvjpeg would not
    assert not tensor.supports(encode(image, "JPEG", exif=exif.tobytes()))
    assert not tensor.supports(encode(image.convert("CMYK"), "JPEG"))
    assert not tensor.supports(encode(image, "PNG"))
    assert not tensor.supports(b"\xff\xd8 not really a jpeg")
    assert tensor.supports(encode(image.convert("L"), "JPEG"))
    assert tensor.decode_each([b"\xff\xd8\xff broken"]) == [None]


def test_mode_selection() -> None:
    assert tensor_decode_enabled("auto", torch.device("cuda"))
    assert not tensor_decode_enabled("auto", CPU)
    assert tensor_decode_enabled("on", CPU)
    assert not tensor_decode_enabled("off", torch.device("cuda"))


def test_engine_tensor_path_keeps_order_errors_and_fallbacks(tiny_model_dir: Path) -> None:
    folders = {"ViT-B-32": tiny_model_dir}
    fast = ClipEngine(ClipSettings(models=["ViT-B-32"], gpu_decode="on", max_batch_size=3), folders)
    slow = ClipEngine(ClipSettings(models=["ViT-B-32"], gpu_decode="off"), folders)
    assert fast.tensor_preprocessors and not slow.tensor_preprocessors
    png = encode(photo_like(4, 90, 70), "PNG")  # falls back to the PIL path
    jobs = [
        Job("ViT-B-32", IMAGES[0], "a"),
        Job("ViT-B-32", b"not an image", "b"),
        Job("ViT-B-32", png, "c"),
        Job("ViT-B-32", IMAGES[1], "   "),
        Job("ViT-B-32", IMAGES[6], "e"),
    ]
    got, _ = fast.run(jobs)
    want, _ = slow.run(jobs)
    assert isinstance(got[1].error, InvalidImageError)
    assert isinstance(got[3].error, EmptyTextError)
    for index in (0, 2, 4):
        assert got[index].cosine is not None and want[index].cosine is not None
        assert abs(got[index].cosine - want[index].cosine) <= MAX_COSINE_DIFF
    assert got[2].cosine == pytest.approx(want[2].cosine, abs=1e-6)
