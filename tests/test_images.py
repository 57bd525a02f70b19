"""Image inputs: encodings, formats, orientation, alpha, limits, and open_clip parity."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms

from clip_runtime.errors import (
    ImageAspectRatioError,
    ImageDimensionsTooLargeError,
    ImageTooLargeError,
    ImageTooManyScansError,
    ImageTooSmallError,
    InvalidImageError,
    UnsupportedImageFormatError,
    UrlNotAllowedError,
)
from clip_runtime.image_inputs import (
    ImageLimits,
    ImagePreprocessor,
    decode_image_field,
    decode_pixels,
    open_header,
    open_image,
    resize_cost,
)
from clip_runtime.jpeg_markers import jpeg_scan_count
from clip_runtime.memory import DecodeBudget, Reservation
from clip_testkit.sample_images import encode, jpeg_bytes, photo_like
from tests.hostile_inputs import many_scan_jpeg, png_header_only

LIMITS = ImageLimits(max_image_bytes=5_000_000, max_image_pixels=4_000_000, min_image_side=4)
L14_CFG = open_clip.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")


def preprocessor(
    tag_model: str = "ViT-B-32", tag: str = "laion2b_s34b_b79k", limits: ImageLimits = LIMITS
) -> ImagePreprocessor:
    cfg = {**open_clip.get_pretrained_cfg(tag_model, tag), "size": 224}
    keys = PreprocessCfg.__dataclass_fields__
    return ImagePreprocessor({k: v for k, v in cfg.items() if k in keys}, limits)


# -- the JSON field -------------------------------------------------------------------------------


def test_base64_variants_all_decode_to_the_same_bytes() -> None:
    data = jpeg_bytes(0, 64, 48)
    plain = base64.b64encode(data).decode()
    variants = [
        plain,
        plain.rstrip("="),
        "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)),
        base64.urlsafe_b64encode(data).decode(),
        "data:image/jpeg;base64," + plain,
        "  data:image/png;base64," + plain + "\n",
        "data:;base64," + plain,
    ]
    for variant in variants:
        assert decode_image_field(variant, 10_000_000) == data


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("!!!!", "not valid base64.*base64, a data: URI or an http"),
        ("cat.jpg", "looks like a file path.*upload endpoint"),
        ("/home/me/photos/cat.jpg", "looks like a file path.*upload endpoint"),
        ("./cat", "looks like a file path"),
        ("C:\\photos\\cat.png", "looks like a file path"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("https://example.com/cat.jpg", "URLs"),
    ],
)
def test_bad_image_fields_are_refused(value: str, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        decode_image_field(value, 10_000_000)


def test_oversized_base64_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError):
        decode_image_field("A" * 4000, 1000)


# -- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "L", {}),
        ("PNG", "P", {}),
        ("PNG", "LA", {}),
        ("PNG", "I;16", {}),
        ("WEBP", "RGB", {}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
    ],
)
def test_formats_decode_to_rgb(fmt: str, mode: str, options: dict[str, object]) -> None:
    base = photo_like(3, 40, 30)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    else:
        image = base.convert(mode)
    decoded = open_image(encode(image, fmt, **options), LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


def test_sixteen_bit_grey_keeps_its_tones() -> None:
    grey = np.full((16, 16), 40000, dtype=np.uint16)
    decoded = open_image(encode(Image.fromarray(grey), "PNG"), LIMITS)
    assert np.asarray(decoded)[0, 0].tolist() == [40000 >> 8] * 3  # not clipped to white


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    decoded = open_image(encode(transparent, "PNG"), LIMITS)
    assert np.asarray(decoded)[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    value = np.asarray(open_image(encode(half, "PNG"), LIMITS))[0, 0, 0]
    assert 120 <= value <= 135


def test_exif_orientation_is_applied() -> None:
    image = photo_like(1, 60, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = open_image(encode(image, "JPEG", exif=exif), LIMITS)
    assert decoded.size == (20, 60)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = open_image(buffer.getvalue(), LIMITS)
    assert np.asarray(decoded)[5, 5].tolist()[0] > 200


def test_unsupported_formats_and_garbage() -> None:
    ico = encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(UnsupportedImageFormatError):
        open_image(ico, LIMITS)
    with pytest.raises(InvalidImageError):
        open_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, LIMITS)
    truncated = jpeg_bytes(0, 200, 200)[:-2000]
    with pytest.raises(InvalidImageError):
        open_image(truncated, LIMITS)


def test_limits() -> None:
    with pytest.raises(ImageTooSmallError):
        open_image(encode(Image.new("RGB", (2, 50)), "PNG"), LIMITS)
    with pytest.raises(ImageTooLargeError):
        open_image(jpeg_bytes(0), ImageLimits(1000, 4_000_000, 4))
    # A 3000x3000 PNG of one colour is a few KB: refused from the header, before decoding.
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    assert len(bomb) < 50_000
    with pytest.raises(ImageDimensionsTooLargeError):
        open_image(bomb, LIMITS)


@pytest.mark.parametrize("size", [(4, 50_000), (1_000_000, 4), (300, 15_001)])
def test_long_thin_images_are_refused_before_decoding(size: tuple[int, int]) -> None:
    """Resizing the short side of a 4x50000 image to 224 px makes 224x2800000 pixels (2.5 GB)
    from a PNG of a few hundred bytes: refused from the header, naming the limit."""
    thin = png_header_only(*size)
    limits = ImageLimits(10_000_000, 4_000_000_000, 4, max_aspect_ratio=50)
    with pytest.raises(ImageAspectRatioError, match=r"over the limit of 50:1"):
        preprocessor(limits=dataclasses.replace(limits, max_aspect_ratio=50.0)).from_bytes(thin)
    with pytest.raises(ImageAspectRatioError, match="CLIP_MAX_IMAGE_ASPECT_RATIO"):
        open_header(thin, limits)
    assert open_header(png_header_only(200, 10_000), limits).size == (200, 10_000)  # 50:1


def test_jpeg_scans_are_counted_from_the_markers() -> None:
    photo = photo_like(0, 96, 64)
    assert jpeg_scan_count(encode(photo, "JPEG"), 100) == 1
    assert jpeg_scan_count(encode(photo, "JPEG", progressive=True), 100) == 10  # libjpeg's script
    assert jpeg_scan_count(encode(photo.convert("L"), "JPEG", progressive=True), 100) == 6
    # A progressive thumbnail inside an APP1 segment is skipped by the segment's length.
    thumbnail = encode(photo_like(1, 16, 16), "JPEG", progressive=True)
    app1 = b"Exif\x00\x00" + thumbnail
    baseline = encode(photo, "JPEG")
    with_thumbnail = baseline[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    assert jpeg_scan_count(with_thumbnail + baseline[2:], 100) == 1
    many = many_scan_jpeg(64, 64, 500)
    assert jpeg_scan_count(many, 1000) == 500
    assert jpeg_scan_count(many, 100) == 101  # stops once past the limit


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_scan_counting_never_raises(tail: bytes) -> None:
    assert jpeg_scan_count(b"\xff\xd8" + tail, 10) >= 0


def test_jpegs_of_many_scans_are_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scan is a pass over the whole image: 2,000 scans of a 3000x2000 JPEG (70 KB) cost
    seconds of decoding. Refused from the markers, before any pixel; not one is decoded."""
    many = many_scan_jpeg(320, 240, 2000)
    ten_scans = encode(photo_like(0, 96, 64), "JPEG", progressive=True)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageTooManyScansError, match=r"more than 100 scans.*CLIP_MAX_JPEG_SCANS"):
        preprocessor().from_bytes(many)
    tight = dataclasses.replace(LIMITS, max_jpeg_scans=9)
    with pytest.raises(ImageTooManyScansError):
        open_header(ten_scans, tight)


def test_the_resize_is_counted_in_the_decode_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image is scaled up to the model's input side and its long side with it: the resize
    allocates more than the decoded image, and its claim must say so."""
    budget = DecodeBudget(max_bytes=1 << 40, wait_s=1)
    claims: list[int] = []
    original = Reservation.grow_to
    monkeypatch.setattr(
        Reservation, "grow_to", lambda self, total: (claims.append(total), original(self, total))
    )
    limits = dataclasses.replace(LIMITS, budget=budget)
    thin = encode(photo_like(0, 4, 200), "PNG")  # 800 pixels, resized to 224x11200
    preprocessor(limits=limits).from_bytes(thin)
    assert claims[-1] >= 224 * 11_200 * 4 + 224 * 200 * 4  # vertical result + horizontal temp
    assert resize_cost((4, 200), 224) == 4 * 224 * (200 + 11_200)


# -- preprocessing parity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "tag"), [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-L-14", "laion2b_s32b_b82k")]
)
def test_split_transform_equals_open_clip_transform(model: str, tag: str) -> None:
    pre = preprocessor(model, tag)
    cfg = {**open_clip.get_pretrained_cfg(model, tag), "size": 224}
    reference = image_transform_v2(
        PreprocessCfg(**{k: v for k, v in cfg.items() if k in PreprocessCfg.__dataclass_fields__}),
        is_train=False,
    )
    image = photo_like(5, 300, 180)  # wide: must be cropped, never squashed
    crop = torch.from_numpy(pre.crop(image).copy()).permute(2, 0, 1)
    ours = pre.to_pixels(crop.unsqueeze(0))[0]
    assert torch.equal(ours, reference(image))


def _open_clip_pil_steps(preprocess_cfg: dict) -> Callable[[Image.Image], Image.Image]:
    """open_clip's eval transform for ``preprocess_cfg`` up to ``ToTensor`` (its PIL half)."""
    steps = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False).transforms
    split = next(i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor))
    return transforms.Compose(steps[:split])


CROP_CFGS = [
    {"size": 224},  # ViT-B-32 and most tags: square, shortest side, bicubic
    {"size": 224, "interpolation": "bilinear"},
    {"size": (224, 192)},  # non-square: open_clip's ResizeKeepRatio, always bicubic
    {"size": 224, "resize_mode": "longest", "fill_color": 127},  # fit, then pad
    {"size": (160, 224), "resize_mode": "longest"},
    {"size": 224, "resize_mode": "squash"},  # the tags trained on squashed images
]
CROP_SIZES = [(640, 480), (481, 640), (224, 224), (225, 223), (7, 1000), (1000, 7), (333, 301)]


@pytest.mark.parametrize("cfg", CROP_CFGS, ids=lambda cfg: "-".join(map(str, cfg.values())))
def test_pillow_crop_equals_open_clips_transform_exactly(cfg: dict) -> None:
    """The front end's torch-free crop against open_clip's own PIL steps (torchvision calling
    Pillow), pixel for pixel, on odd and extreme sizes: same resize size and filter, same
    centre (or padding), never a squash where the tag does not squash."""
    full = {**asdict(PreprocessCfg()), **cfg}
    ours, theirs = ImagePreprocessor(full, LIMITS), _open_clip_pil_steps(full)
    noise = np.random.default_rng(3)
    for width, height in CROP_SIZES:
        image = Image.fromarray(noise.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = np.asarray(theirs(image))
        assert np.array_equal(ours.crop(image), expected), (width, height)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "I", "CMYK", "1"])
def test_pillow_crop_of_other_modes_equals_open_clip_on_the_rgb_decode(mode: str) -> None:
    """Any mode is made RGB first as ``decode_pixels`` makes it (alpha over white, 16-bit
    narrowed), then cropped exactly as open_clip crops that RGB image; greyscale, whose
    conversion commutes with the resize, equals open_clip's transform of the image itself."""
    full = {**asdict(PreprocessCfg()), "size": 224}
    ours, theirs = ImagePreprocessor(full, LIMITS), _open_clip_pil_steps(full)
    base = photo_like(4, 301, 237)
    if mode in {"I;16", "I"}:
        wide = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        image = wide if mode == "I;16" else wide.convert("I")
    else:
        image = base.convert(mode)
    assert image.mode == mode
    expected = np.asarray(theirs(decode_pixels(image.copy())))
    assert np.array_equal(ours.crop(image), expected)
    if mode == "L":
        assert np.array_equal(ours.crop(image), np.asarray(theirs(image)))


def test_the_model_worker_refuses_a_crop_that_open_clip_would_not_make() -> None:
    """``normalize`` (built on the model worker) checks the Pillow crop against open_clip's
    transform first: a crop that has drifted from it refuses to start."""
    pre = preprocessor()
    pre.resample = Image.Resampling.BILINEAR  # as if open_clip had changed its filter
    with pytest.raises(ValueError, match="differs from open_clip"):
        _ = pre.normalize


def test_each_tag_keeps_its_own_normalization() -> None:
    assert tuple(L14_CFG["mean"]) == (0.5, 0.5, 0.5)
    b32, l14 = preprocessor(), preprocessor("ViT-L-14", "laion2b_s32b_b82k")
    assert tuple(l14.normalize.mean) == (0.5, 0.5, 0.5)
    assert tuple(b32.normalize.mean) != tuple(l14.normalize.mean)


# -- properties -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_unexpected_errors(data: bytes) -> None:
    pre = preprocessor()
    try:
        crop = pre.from_bytes(data)
    except (
        InvalidImageError,
        UnsupportedImageFormatError,
        ImageTooSmallError,
        ImageDimensionsTooLargeError,
        ImageTooLargeError,
        ImageAspectRatioError,
        ImageTooManyScansError,
    ):
        return
    assert crop.shape == (224, 224, 3)


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 400), st.integers(4, 400), st.sampled_from(["JPEG", "PNG", "WEBP", "BMP"]))
def test_any_valid_image_size_gives_a_model_sized_crop(width: int, height: int, fmt: str) -> None:
    data = encode(photo_like(0, width, height), fmt)
    if max(width, height) > LIMITS.max_aspect_ratio * min(width, height):
        with pytest.raises(ImageAspectRatioError):
            preprocessor().from_bytes(data)
        return
    crop = preprocessor().from_bytes(data)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=200))
def test_arbitrary_text_fields_decode_or_raise_a_domain_error(value: str) -> None:
    # A value that starts like a URI (``a:``) is a refused URL scheme, never base64.
    with contextlib.suppress(InvalidImageError, ImageTooLargeError, UrlNotAllowedError):
        decode_image_field(value, 1_000_000)


def test_plain_base64_skips_the_whitespace_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import clip_runtime.image_field as image_field

    data = jpeg_bytes(3, 40, 30)
    wrapped = base64.encodebytes(data).decode()  # line breaks every 76 characters
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert decode_image_field(wrapped, 1_000_000) == data
    assert decode_image_field(urlsafe, 1_000_000) == data

    class NoRegexPass:
        def sub(self, *args: object) -> str:
            raise AssertionError("the whitespace regex ran on plain base64")

    monkeypatch.setattr(image_field, "_WHITESPACE", NoRegexPass())
    assert decode_image_field(base64.b64encode(data).decode(), 1_000_000) == data
    data_uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    assert decode_image_field(data_uri, 1_000_000) == data
