"""A per-process memory budget for image decoding, and giving freed heap back to the system.

Decoding is where a small request becomes a large allocation (a 77 KB PNG can claim 80 MB of
pixels). Each decode reserves its cost, estimated from the header before any pixel is decoded;
while the budget is spent, a decode waits briefly and is then refused as overload (503), so the
peak stays near the budget whatever the number of decode threads or concurrent requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from clip_runtime.errors import OverloadedError

# After a decode at least this large, freed memory is handed back once nothing is in flight:
# glibc keeps freed heap (per-thread arenas especially) for reuse and never shrinks RSS itself.
TRIM_AFTER_BYTES = 32 * 1024 * 1024


def _load_malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only; musl and macOS have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> bool:
    """Return free heap pages to the system (glibc ``malloc_trim``); False where unavailable."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class DecodeBudget:
    """Bytes that decodes in flight in this process may claim at once (thread-safe)."""

    def __init__(self, max_bytes: int, wait_s: float) -> None:
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.in_flight = 0
        self.trims = 0
        self._large_since_trim = False
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold ``cost`` bytes for the block. A cost above the whole budget still runs alone
        (the pixel limit bounds it), so no valid image is refused on an idle worker."""
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            while self.in_flight and self.in_flight + cost > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    raise OverloadedError(
                        "image decoding is at its memory budget in this worker; retry later"
                    )
            self.in_flight += cost
            self._large_since_trim |= cost >= TRIM_AFTER_BYTES
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= cost
                trim = self._large_since_trim and self.in_flight == 0
                if trim:
                    self._large_since_trim = False
                self._changed.notify_all()
            if trim and trim_heap():
                self.trims += 1
