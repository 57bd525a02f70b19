"""The decode memory budget, heap trimming, and the 16-bit path that no longer widens to int64."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from clip_runtime import memory
from clip_runtime.errors import OverloadedError
from clip_runtime.images import ImageLimits, decode_cost, open_header, open_image
from clip_runtime.memory import DecodeBudget

LIMITS = ImageLimits(max_image_bytes=10_000_000, max_image_pixels=50_000_000, min_image_side=4)


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
