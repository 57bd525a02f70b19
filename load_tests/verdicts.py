"""What an answer means to the load tests (shared by the Locust workloads and the fault checks).

Only a deliberate shed passes as a 503: ``overloaded`` with Retry-After. ``model_not_ready`` is
right only while a check has killed the model worker itself; everywhere else it is a failure.
"""

from __future__ import annotations

import json

SHED_STATUSES = {429, 503}


def error_code(body: str | bytes) -> str | None:
    """``code`` of the error envelope ``{"error": {"code": ...}}``; None when there is none."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def is_deliberate_shed(status: int, retry_after: str | None, code: str | None) -> bool:
    return status in SHED_STATUSES and bool(retry_after) and code == "overloaded"


def is_worker_down_answer(status: int, retry_after: str | None, code: str | None) -> bool:
    return status == 503 and bool(retry_after) and code == "model_not_ready"
