"""BentoML's log of a client mistake becomes one WARNING line without traceback or payload."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from bentoml._internal.server import http_app
from bentoml.exceptions import InternalServerError, InvalidArgument
from pydantic import BaseModel, ValidationError

from clip_service.http_errors import CURRENT_REQUEST_ID
from clip_service.middleware.client_logs import BENTOML_API_ERROR_LOGGER, quiet_client_error_logs


class Body(BaseModel):
    text: str


def log_failure(exc: Exception) -> None:
    """What BentoML does for a failed API call, through its own function (fails if it moves)."""
    request = SimpleNamespace(url=SimpleNamespace(path="/evaluator/x"), method="POST")
    try:
        raise exc
    except Exception:
        http_app.log_exception(request)  # type: ignore[arg-type]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    quiet_client_error_logs()
    quiet_client_error_logs()  # idempotent: one filter however many workers' middlewares
    api_logger = logging.getLogger(BENTOML_API_ERROR_LOGGER)
    assert len(api_logger.filters) == 1
    collect = Collect()
    api_logger.addHandler(collect)  # BentoML's loggers may not propagate to pytest's
    yield collect.records
    api_logger.removeHandler(collect)


def test_client_errors_are_one_warning_without_payload(records: list[logging.LogRecord]) -> None:
    secret = "PAYLOAD-" * 20
    try:
        Body.model_validate({"text": [secret]})
    except ValidationError as exc:
        log_failure(exc)
    log_failure(InvalidArgument(f"bad {secret}"))
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    for record in records:
        assert record.name == BENTOML_API_ERROR_LOGGER
        assert record.exc_info is None and secret not in record.getMessage()
    assert records[0].getMessage() == "client error 400 on /evaluator/x [POST]: ValidationError"


def test_server_errors_keep_their_traceback(records: list[logging.LogRecord]) -> None:
    log_failure(InternalServerError("boom"))
    log_failure(RuntimeError("boom"))
    assert [r.levelno for r in records] == [logging.ERROR] * 2
    assert all(r.exc_info for r in records)


def test_lines_carry_the_request_id_of_the_answer(records: list[logging.LogRecord]) -> None:
    token = CURRENT_REQUEST_ID.set("req-7")  # what RequestIdMiddleware sets per request
    try:
        log_failure(InvalidArgument("bad"))
        log_failure(RuntimeError("boom"))
    finally:
        CURRENT_REQUEST_ID.reset(token)
    client, server = (record.getMessage() for record in records)
    assert client == "client error 400 on /evaluator/x [POST]: InvalidArgument (request req-7)"
    assert server.endswith("(request req-7)") and records[1].exc_info


def test_a_client_that_left_mid_body_is_no_server_error(records: list[logging.LogRecord]) -> None:
    """Starlette raises ClientDisconnect when the client leaves while its body is read; BentoML
    logged that as an ERROR with a traceback, like a crash."""
    from starlette.requests import ClientDisconnect

    log_failure(ClientDisconnect())
    assert [r.levelno for r in records] == [logging.INFO]
    assert records[0].exc_info is None
    assert records[0].getMessage() == "client error 499 on /evaluator/x [POST]: ClientDisconnect"
