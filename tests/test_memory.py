"""The decode memory budget, heap trimming, and the 16-bit path that no longer widens to int64."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_runtime import memory
from clip_runtime.errors import OverloadedError
from clip_runtime.images import (
    DRAFT_MIN_FACTOR,
    ImageLimits,
    decode_cost,
    open_header,
    open_image,
)
from clip_runtime.memory import DecodeBudget
from clip_runtime.model import ClipModel
from clip_testkit.images import encode, photo_like

LIMITS = ImageLimits(max_image_bytes=10_000_000, max_image_pixels=50_000_000, min_image_side=4)
# (seed, size): reduced 1/4, reduced 1/2, just under the threshold (decoded whole).
SIZES = [(1, (3600, 3600)), (2, (2000, 1800)), (3, (1700, 1200))]


def test_over_budget_waits_then_is_refused() -> None:
    budget = DecodeBudget(max_bytes=100, wait_s=0.2)
    with budget.reserve(80):
        started = time.monotonic()
        with pytest.raises(OverloadedError), budget.reserve(30):
            pass
        assert time.monotonic() - started >= 0.2
        with budget.reserve(20):  # what fits runs at once
            assert budget.in_flight == 100
    assert budget.in_flight == 0
    with budget.reserve(1000):  # larger than the whole budget, alone: runs
        pass


def test_a_waiting_decode_runs_when_budget_frees() -> None:
    budget = DecodeBudget(max_bytes=100, wait_s=5)
    entered = threading.Event()

    def hold() -> None:
        with budget.reserve(90):
            entered.set()
            time.sleep(0.2)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    with budget.reserve(50):
        assert budget.in_flight == 50
    holder.join()


def test_heap_is_trimmed_after_a_large_decode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_MALLOC_TRIM", calls.append)
    budget = DecodeBudget(max_bytes=1 << 40, wait_s=0)
    with budget.reserve(1024):
        pass
    assert calls == []
    with budget.reserve(memory.TRIM_AFTER_BYTES), budget.reserve(1024):
        pass
    assert calls == [0] and budget.trims == 1  # once, when nothing was in flight any more


def test_glibc_malloc_trim_is_found_on_linux() -> None:
    assert memory.trim_heap() is True  # this project runs on glibc Linux (CI and images)


def test_decode_cost_is_read_from_the_header() -> None:
    buffer = io.BytesIO()
    Image.new("I;16", (3000, 2000), 1000).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert decode_cost(open_header(data, LIMITS), len(data)) == len(data) + 6_000_000 * 10


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_wide_greyscale_scales_as_before(mode: str) -> None:
    values = np.array([[0, 255, 256, 40_000, 65_535, 1]] * 4, dtype=np.int32)
    image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))
    image = image.convert(mode) if image.mode != mode else image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode == "I;16" else "TIFF")  # PNG has no 32-bit grey
    rgb = np.asarray(open_image(buffer.getvalue(), LIMITS))
    expected = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)  # the former int64 arithmetic
    assert (rgb[..., 0] == expected).all()


def test_a_claim_grows_with_its_body_then_to_its_decode_never_both() -> None:
    budget = DecodeBudget(max_bytes=1000, wait_s=0.1)
    claim = budget.reservation()
    assert claim.try_grow_to(300) and budget.in_flight == 300  # the URL body so far
    claim.grow_to(700)  # its decode, estimated from the header, includes the body
    assert budget.in_flight == 700
    other = budget.reservation()
    assert not other.try_grow_to(400)  # does not fit now: nothing claimed
    assert budget.in_flight == 700
    with pytest.raises(OverloadedError):
        other.grow_to(400)
    claim.release()
    assert budget.in_flight == 0 and other.try_grow_to(400)
    other.release()
    assert budget.in_flight == 0


def test_a_claim_released_while_waiting_claims_nothing() -> None:
    """A request cancelled (client gone, fetch deadline) while its body waited for budget: the
    waiting thread must not claim bytes after the request released the claim."""
    budget = DecodeBudget(max_bytes=100, wait_s=5)
    holder, waiter = budget.reservation(), budget.reservation()
    holder.grow_to(90)
    thread = threading.Thread(target=waiter.grow_to, args=(50,))
    thread.start()
    time.sleep(0.1)
    waiter.release()
    holder.release()
    thread.join(5)
    assert not thread.is_alive() and budget.in_flight == 0


def test_large_jpegs_decode_drafted_within_bounds_of_the_full_decode(b32_model_dir: Path) -> None:
    """JPEGs far larger than the input decode at 1/2..1/8 scale (`Image.draft`): a fraction of
    the pixels, crops within 4 uint8 levels and cosines within 2e-3 of the full decode
    (random-init ViT-B-32). Smaller JPEGs and other formats decode exactly as before."""
    model = ClipModel("test", b32_model_dir, torch.device("cpu"), torch.float32, LIMITS, 16)
    preprocessor = model.preprocessor
    images = [encode(photo_like(seed, *size), "JPEG", quality=90) for seed, size in SIZES]
    exact = [preprocessor.crop(open_image(data, LIMITS)) for data in images]
    drafted = [preprocessor.from_bytes(data) for data in images]
    for data, (_, size) in zip(images, SIZES, strict=True):
        header = preprocessor.draft(open_header(data, LIMITS))
        reduced = min(size) >= 2 * DRAFT_MIN_FACTOR * 224
        assert (header.size != size) is reduced
        assert min(header.size) >= DRAFT_MIN_FACTOR * 224
    levels = max(
        np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(exact, drafted, strict=True)
    )
    assert levels <= 4  # 3 seen
    texts = [f"a photo of thing {i}" for i in range(len(images))]
    keep = [False] * len(images)
    exact_cos = [pair.cosine for pair in model.run(exact, texts, keep)]
    drafted_cos = [pair.cosine for pair in model.run(drafted, texts, keep)]
    print(
        "draft vs full decode: uint8 levels",
        levels,
        "cosine",
        max(abs(a - b) for a, b in zip(drafted_cos, exact_cos, strict=True)),
    )
    np.testing.assert_allclose(drafted_cos, exact_cos, atol=2e-3)
    png = encode(photo_like(9, 2000, 1800), "PNG")
    assert preprocessor.draft(open_header(png, LIMITS)).size == (2000, 1800)
