"""The decode memory budget, heap trimming, and the 16-bit path that no longer widens to int64."""

from __future__ import annotations

import gc
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_runtime import memory
from clip_runtime.errors import OverloadedError
from clip_runtime.image_inputs import (
    DRAFT_MIN_FACTOR,
    ImageLimits,
    decode_cost,
    open_header,
    open_image,
)
from clip_runtime.memory import DecodeBudget
from clip_runtime.model import ClipModel
from clip_runtime.runtimes import torch_plan
from clip_testkit.sample_images import encode, photo_like

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


def test_heap_is_trimmed_after_a_spike_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memory, "_MALLOC_TRIM", calls.append)
    budget = DecodeBudget(max_bytes=1 << 40, wait_s=0, trim_delay_s=0.2)
    for _ in range(40):  # 40 MiB in all, never more than 1 MiB at once: no spike
        with budget.reserve(1 << 20):
            pass
    time.sleep(0.4)
    assert calls == []  # steady small decodes: nothing to give back, no arena walks under load
    with budget.reserve(memory.TRIM_AFTER_BYTES), budget.reserve(1024):
        pass
    assert calls == []  # not at once: what the request frees after its claim counts too
    assert eventually(lambda: budget.trims == 1)  # (its full collection is slow in pytest)
    assert calls == [0]  # once, when nothing was in flight any more
    with budget.reserve(memory.TRIM_AFTER_BYTES):
        pass
    with budget.reserve(1024):  # busy again when the delay ends: the next idle moment trims
        time.sleep(0.4)
        assert budget.trims == 1
    assert eventually(lambda: budget.trims == 2)


def eventually(condition: Callable[[], bool], within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_trim_collects_garbage_held_in_reference_cycles() -> None:
    """httpx leaves a reference cycle per client; the trim frees what such cycles hold."""
    freed = threading.Event()

    class Holder:
        def __init__(self) -> None:
            self.me = self
            self.buffer = bytearray(1 << 20)

        def __del__(self) -> None:
            freed.set()

    gc.disable()  # no automatic collection between here and the trim
    try:
        Holder()
        assert not freed.is_set()
        memory.trim_heap()
        assert freed.is_set()
    finally:
        gc.enable()


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
    assert claim.try_grow_body_to(300) and budget.in_flight == 300  # the URL body so far
    assert budget.bodies_in_flight == 300
    claim.grow_to(700)  # its decode, estimated from the header, includes the body
    assert (budget.in_flight, budget.bodies_in_flight) == (700, 0)
    other = budget.reservation()
    assert not other.try_grow_body_to(400)  # does not fit now: nothing claimed
    assert budget.in_flight == 700
    with pytest.raises(OverloadedError):
        other.grow_to(400)
    claim.release()
    assert budget.in_flight == 0 and other.try_grow_body_to(400)
    other.release()
    assert budget.in_flight == budget.bodies_in_flight == 0


def test_bodies_hold_at_most_half_so_decodes_always_have_room() -> None:
    budget = DecodeBudget(max_bytes=1000, wait_s=0.1)
    first, second, third = budget.reservation(), budget.reservation(), budget.reservation()
    assert first.try_grow_body_to(400)
    assert not second.try_grow_body_to(200)  # 600 of bodies: over their half
    assert second.try_grow_body_to(100)
    third.grow_to(450)  # a decode may use the rest: 950 of 1000
    first.grow_to(450)  # first's body becomes its decode: 1000 in all, 100 of bodies
    assert (budget.in_flight, budget.bodies_in_flight) == (1000, 100)
    for claim in (first, second, third):
        claim.release()
    alone = budget.reservation()
    assert alone.try_grow_body_to(900)  # alone it may exceed the share: it cannot starve anyone
    alone.release()


def many_bodies_then_decodes(budget: DecodeBudget) -> list[BaseException]:
    """Twelve images: each claims its declared body length whole, streams it, then decodes two
    at a time (the decode pool). What each raised."""
    decode_pool = threading.Semaphore(2)
    failures: list[BaseException] = []

    def image(seed: int) -> None:
        claim = budget.reservation()
        try:
            claim.grow_body_to(20)  # the declared length, before the first byte
            for received in range(4, 21, 4):  # then the body as it arrives: already claimed
                claim.grow_body_to(received)
                time.sleep(0.005 * (seed % 3 + 1))
            with decode_pool:
                claim.grow_to(35)  # body + pixels
                time.sleep(0.02)
        except BaseException as error:
            failures.append(error)
        finally:
            claim.release()

    threads = [threading.Thread(target=image, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return failures


def test_many_bodies_under_a_small_budget_all_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """With bodies capped at half the budget every image finishes; when bodies may fill it,
    they do, no decode fits, and the waits end in 503 ``overloaded``."""
    budget = DecodeBudget(max_bytes=100, wait_s=1, trim_delay_s=60)
    assert many_bodies_then_decodes(budget) == []
    assert budget.in_flight == budget.bodies_in_flight == 0
    monkeypatch.setattr(DecodeBudget, "max_body_bytes", property(lambda self: self.max_bytes))
    failures = many_bodies_then_decodes(DecodeBudget(max_bytes=100, wait_s=1, trim_delay_s=60))
    assert failures and all(isinstance(f, OverloadedError) for f in failures)


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
    model = ClipModel("test", b32_model_dir, torch_plan(torch.device("cpu")), LIMITS, 16)
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
    exact_cos = [pair.cosine for pair in model.score_batch(exact, texts, keep)]
    drafted_cos = [pair.cosine for pair in model.score_batch(drafted, texts, keep)]
    print(
        "draft vs full decode: uint8 levels",
        levels,
        "cosine",
        max(abs(a - b) for a, b in zip(drafted_cos, exact_cos, strict=True)),
    )
    np.testing.assert_allclose(drafted_cos, exact_cos, atol=2e-3)
    png = encode(photo_like(9, 2000, 1800), "PNG")
    assert preprocessor.draft(open_header(png, LIMITS)).size == (2000, 1800)
