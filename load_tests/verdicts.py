"""What an answer means to the load tests (shared by the Locust workloads and the fault checks).

Only a deliberate shed passes as a 503: ``overloaded`` with Retry-After. ``model_not_ready`` is
right only while a check has killed the model worker itself; everywhere else it is a failure.
"""

from __future__ import annotations

from clip_testkit.loadgen import error_code

__all__ = ["error_code", "is_deliberate_shed", "is_worker_down_answer"]

SHED_STATUSES = {429, 503}


def is_deliberate_shed(status: int, retry_after: str | None, code: str | None) -> bool:
    return status in SHED_STATUSES and bool(retry_after) and code == "overloaded"


def is_worker_down_answer(status: int, retry_after: str | None, code: str | None) -> bool:
    return status == 503 and bool(retry_after) and code == "model_not_ready"
