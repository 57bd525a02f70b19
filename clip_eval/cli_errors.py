"""Errors of the CLI itself, and the per-pair errors of getting an image from a dataset.

Run-level errors stop the run with a message and an exit status; per-pair errors are
``ClipError``s with stable codes, recorded in the output's ``error`` column like the engine's own.
"""

from __future__ import annotations

from clip_runtime.errors import ClipError


class ClipEvalError(Exception):
    """The run cannot go on (service gone after retries, bad output state, ...): exit 1."""

    exit_code = 1


class UsageError(ClipEvalError):
    """A problem the user fixes in the command or the files (missing column, file, flag): exit 2."""

    exit_code = 2


class ImageNotFoundError(ClipError):
    code = "image_not_found"


class ImageUnreadableError(ClipError):
    code = "image_unreadable"


class ServiceItemError(ClipError):
    """One item the service refused, with the service's own error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
