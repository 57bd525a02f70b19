"""The load tests' verdicts: only a deliberate shed (``overloaded``) passes as a 503."""

from __future__ import annotations

import json

import pytest

from clip_testkit.loadgen import RequestRecord
from load_tests.faults import is_failure, is_shed, is_worker_down
from load_tests.verdicts import error_code


def _envelope(code: str) -> str:
    return json.dumps({"error": {"code": code, "message": "m", "request_id": "r"}})


@pytest.mark.parametrize(
    ("status", "retry_after", "code", "shed", "worker_down"),
    [
        (503, "1", "overloaded", True, False),
        (429, "1", "overloaded", True, False),
        (503, None, "overloaded", False, False),
        (503, "1", "model_not_ready", False, True),
        (503, "1", None, False, False),
        (500, None, "internal_error", False, False),
        (0, None, None, False, False),
    ],
)
def test_only_an_overloaded_answer_with_retry_after_is_a_shed(
    status: int, retry_after: str | None, code: str | None, shed: bool, worker_down: bool
) -> None:
    record = RequestRecord(0.0, status, 0.01, retry_after, code)
    assert is_shed(record) is shed
    assert is_worker_down(record) is worker_down
    assert is_failure(record) is not shed  # model_not_ready fails unless a check killed it


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_envelope("overloaded"), "overloaded"),
        (_envelope("model_not_ready").encode(), "model_not_ready"),
        ("Service Unavailable", None),
        ('["not", "an", "object"]', None),
        ('{"error": "a string"}', None),
    ],
)
def test_error_code_reads_the_envelope_and_tolerates_other_bodies(
    body: str | bytes, code: str | None
) -> None:
    assert error_code(body) == code
