"""A per-process memory budget for image decoding, and giving freed heap back to the system.

Decoding is where a small request becomes a large allocation (a small compressed PNG can claim a
pixel buffer thousands of times its size). Each decode reserves its cost, estimated from the
header before any pixel is decoded, and each URL body its bytes; while the budget is spent, a
claim waits briefly and is then refused as overload (503), so what is in flight stays within the
budget whatever the number of decode threads or concurrent requests. Freed memory is given back
once the budget goes idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from clip_runtime.errors import OverloadedError

# After a spike (decodes and bodies in flight at least this large at once), freed memory is
# handed back once nothing is in flight: glibc keeps freed heap for reuse and never shrinks RSS
# itself. Steady small decodes never trim: a trim locks the allocator's arenas while it walks
# them, and trimming every idle second under load stalled the event loop (docs/reliability.md).
TRIM_AFTER_BYTES = 32 * 1024 * 1024
# ... that long after the budget went idle, if it still is: the requests' bodies, crops and
# responses are freed just after their last claim, and a trim at that moment would miss them.
TRIM_DELAY_S = 1.0


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only; musl and macOS have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> bool:
    """Free what only reference cycles still hold, then return free heap pages to the system
    (glibc ``malloc_trim``); False where ``malloc_trim`` is unavailable.

    The collection comes first because the collector's own schedule may not run a full pass for
    a long time, and cycles hold real memory: every httpx client leaves one, with its
    connection's receive buffer (docs/reliability.md has the figures)."""
    gc.collect()
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


def freeze_startup_objects() -> None:
    """Collect, then move every object alive now out of the collector's reach (``gc.freeze``):
    after torch and open_clip are imported that is hundreds of thousands of objects, and a full
    collection walks them all with the GIL held (``trim_heap`` runs one; docs/reliability.md has
    the figures). Call once start-up is done."""
    gc.collect()
    gc.freeze()


class DecodeBudget:
    """Bytes that decodes (and the URL bodies waiting for them) in flight in this process may
    claim at once (thread-safe).

    Bodies may hold at most half of it (``max_body_bytes``): a body that is still arriving, or
    waiting for a decode thread, cannot be given back, and bodies filling the whole budget left
    no decode room to finish any of them (docs/reliability.md: not one image decoded).
    """

    def __init__(self, max_bytes: int, wait_s: float, trim_delay_s: float = TRIM_DELAY_S) -> None:
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.trim_delay_s = trim_delay_s
        self.in_flight = 0
        self.bodies_in_flight = 0
        self.trims = 0
        self._peak_since_trim = 0
        self._trim_timer: threading.Timer | None = None
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

    @property
    def max_body_bytes(self) -> int:
        return self.max_bytes // 2

    def _fits(self, extra: int, own: int, body: bool) -> bool:
        if self.in_flight == own:  # alone: it runs, whatever its size
            return True
        if self.in_flight + extra > self.max_bytes:
            return False
        return not body or self.bodies_in_flight + extra <= self.max_body_bytes

    def _grow(self, claim: Reservation, total: int, wait: bool, body: bool) -> bool:
        extra = total - claim.bytes
        if extra <= 0:
            return True
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            while not claim.released and not self._fits(extra, claim.bytes, body):
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
            if body:
                self.bodies_in_flight += extra
                claim.body_bytes += extra
            else:  # a decode's cost includes its encoded bytes: no longer a body waiting
                self.bodies_in_flight -= claim.body_bytes
                claim.body_bytes = 0
            self._peak_since_trim = max(self._peak_since_trim, self.in_flight)
        return True

    def _release(self, claim: Reservation) -> None:
        timer = None
        with self._changed:
            self.in_flight -= claim.bytes
            self.bodies_in_flight -= claim.body_bytes
            claim.bytes = claim.body_bytes = 0
            claim.released = True
            due = self._peak_since_trim >= TRIM_AFTER_BYTES
            if due and self.in_flight == 0 and self._trim_timer is None:
                timer = self._trim_timer = threading.Timer(self.trim_delay_s, self._trim_if_idle)
                timer.daemon = True
            self._changed.notify_all()
        if timer is not None:
            timer.start()

    def _trim_if_idle(self) -> None:
        with self._changed:
            self._trim_timer = None
            if self.in_flight or self._peak_since_trim < TRIM_AFTER_BYTES:
                return  # busy again: the release that next leaves it idle schedules the trim
            self._peak_since_trim = 0
        if trim_heap():
            self.trims += 1


class Reservation:
    """One image's claim on a ``DecodeBudget``: the URL body as it streams in (``grow_body_to``),
    then the decode estimated from the header (``grow_to``; the claim grows to the larger, it
    never counts both)."""

    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.bytes = 0
        self.body_bytes = 0  # the part of ``bytes`` that counts against the bodies' share
        self.released = False

    def grow_to(self, total: int) -> None:
        """Claim ``total`` bytes in all for the decode; waits up to the budget's ``wait_s``, then
        raises ``OverloadedError``. Blocking: off the event loop."""
        self.budget._grow(self, total, wait=True, body=False)

    def grow_body_to(self, total: int) -> None:
        """Claim ``total`` bytes in all for a body, within the bodies' share; waits like
        ``grow_to``. Blocking: off the event loop, or after ``try_grow_body_to`` failed."""
        self.budget._grow(self, total, wait=True, body=True)

    def try_grow_body_to(self, total: int) -> bool:
        """``grow_body_to`` if it fits now; False (nothing claimed) if not."""
        return self.budget._grow(self, total, wait=False, body=True)

    def release(self) -> None:
        self.budget._release(self)
