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
    """Bytes that decodes (and the URL bodies waiting for them) in flight in this process may
    claim at once (thread-safe)."""

    def __init__(self, max_bytes: int, wait_s: float) -> None:
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.in_flight = 0
        self.trims = 0
        self._large_since_trim = False
        self._changed = threading.Condition()

    def reservation(self) -> Reservation:
        """An empty claim that grows as its image arrives and is decoded; release it after."""
        return Reservation(self)

    @contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold ``cost`` bytes for the block. A cost above the whole budget still runs alone
        (the pixel limit bounds it), so no valid image is refused on an idle worker."""
        claim = self.reservation()
        claim.grow_to(cost)
        try:
            yield
        finally:
            claim.release()

    def _fits(self, extra: int, own: int) -> bool:
        return self.in_flight == own or self.in_flight + extra <= self.max_bytes

    def _grow(self, claim: Reservation, total: int, wait: bool) -> bool:
        extra = total - claim.bytes
        if extra <= 0:
            return True
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            while not claim.released and not self._fits(extra, claim.bytes):
                left = deadline - time.monotonic()
                if not wait:
                    return False
                if left <= 0 or not self._changed.wait(left):
                    raise OverloadedError(
                        "image decoding is at its memory budget in this worker; retry later"
                    )
            if claim.released:  # released while this waited (its request was cancelled)
                return False
            self.in_flight += extra
            claim.bytes = total
            self._large_since_trim |= total >= TRIM_AFTER_BYTES
        return True

    def _release(self, claim: Reservation) -> None:
        with self._changed:
            self.in_flight -= claim.bytes
            claim.bytes = 0
            claim.released = True
            trim = self._large_since_trim and self.in_flight == 0
            if trim:
                self._large_since_trim = False
            self._changed.notify_all()
        if trim and trim_heap():
            self.trims += 1


class Reservation:
    """One image's claim on a ``DecodeBudget``: the URL body as it streams in, then the decode
    estimated from the header (the claim grows to the larger, it never counts both)."""

    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.bytes = 0
        self.released = False

    def grow_to(self, total: int) -> None:
        """Claim ``total`` bytes in all; waits up to the budget's ``wait_s``, then raises
        ``OverloadedError``. Blocking: off the event loop, or after ``try_grow_to`` failed."""
        self.budget._grow(self, total, wait=True)

    def try_grow_to(self, total: int) -> bool:
        """Claim ``total`` bytes in all if they fit now; False (nothing claimed) if not."""
        return self.budget._grow(self, total, wait=False)

    def release(self) -> None:
        self.budget._release(self)
