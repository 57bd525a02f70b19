"""Client mistakes are logged as one line, not as BentoML's ERROR with a traceback."""

from __future__ import annotations

import logging
from http import HTTPStatus

from clip_service.http_errors import CLIENT_CLOSED_REQUEST, CURRENT_REQUEST_ID

# BentoML logs every failed API call here, client mistakes included, at ERROR with a traceback
# whose exception text quotes the request body (``log_exception``, bentoml._internal).
BENTOML_API_ERROR_LOGGER = "bentoml._internal.server.http_app"


class ClientErrorLogFilter(logging.Filter):
    """Turns BentoML's ERROR-with-traceback for a client mistake (a validation error or a 4xx
    BentoML exception) into one WARNING line without traceback or payload."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        # The id the answer shows (ids are [A-Za-z0-9._:-] or a uuid: no % to format).
        request_id = CURRENT_REQUEST_ID.get()
        with_id = "" if request_id is None else f" (request {request_id})"
        exc = record.exc_info[1]
        status = _client_error_status(exc)
        if status is None:  # a server error keeps its traceback, and gets the id
            record.msg = f"{record.msg}{with_id}"
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        path, method = (*args, "?", "?")[:2]
        record.msg = "client error %s on %s [%s]: %s" + with_id
        record.args = (status, path, method, type(exc).__name__)
        level = logging.INFO if status == CLIENT_CLOSED_REQUEST else logging.WARNING
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info = record.exc_text = None
        return True


def _client_error_status(exc: BaseException | None) -> int | None:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError
    from starlette.requests import ClientDisconnect

    from clip_service.middleware.body import BodyRefused

    if isinstance(exc, ClientDisconnect):  # the client left mid-body: not a server error
        return CLIENT_CLOSED_REQUEST
    if isinstance(exc, BodyRefused):  # too large or too slow: the body guards answer it
        return exc.status
    if isinstance(exc, ValidationError):
        return int(HTTPStatus.BAD_REQUEST)
    if isinstance(exc, BentoMLException) and int(exc.error_code) < 500:
        return int(exc.error_code)
    return None


def quiet_client_error_logs() -> None:
    api_logger = logging.getLogger(BENTOML_API_ERROR_LOGGER)
    if not any(isinstance(f, ClientErrorLogFilter) for f in api_logger.filters):
        api_logger.addFilter(ClientErrorLogFilter())
