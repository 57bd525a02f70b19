"""Shutdown order for the model worker.

On SIGTERM, circus signals every worker at once. If the model worker stopped at once, requests
the HTTP worker is still decoding would find no model to score them (a 500 for work that was
accepted). So the model worker keeps serving until its sibling workers (the HTTP workers under
the same arbiter) have drained and exited, at most ``cap_s``, and only then stops as usual.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

import psutil


def _wait_for_siblings(cap_s: float) -> None:
    me = psutil.Process()
    deadline = time.monotonic() + cap_s
    while time.monotonic() < deadline:
        try:
            parent = me.parent()
            siblings = [p for p in parent.children() if p.pid != me.pid] if parent else []
        except psutil.Error:
            return
        if not siblings:
            return
        time.sleep(0.2)


def stop_after_siblings_on_sigterm(cap_s: float) -> None:
    """Wrap the server's SIGTERM handler (call from the main thread, once it is installed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return

    def deferred(signum: int, frame: FrameType | None) -> None:
        def stop() -> None:
            _wait_for_siblings(cap_s)
            previous(signum, frame)  # uvicorn's handler only sets its should_exit flag

        threading.Thread(target=stop, name="deferred-sigterm", daemon=True).start()

    handler: Any = deferred
    signal.signal(signal.SIGTERM, handler)
