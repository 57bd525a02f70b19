"""Domain errors. Each carries a stable machine-readable ``code``; the service maps codes to HTTP
statuses in one table, so nothing here knows about HTTP."""

from __future__ import annotations


class ClipError(Exception):
    """Base of every error the engine reports to a caller."""

    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(ClipError):
    code = "invalid_request"


class InvalidImageError(ClipError):
    code = "invalid_image"


class UnsupportedImageFormatError(ClipError):
    code = "unsupported_image_format"


class ImageTooLargeError(ClipError):
    """The encoded image has more bytes than allowed."""

    code = "image_too_large"


class ImageDimensionsTooLargeError(ClipError):
    """More pixels than allowed: refused from the header, before decoding (bomb guard)."""

    code = "image_dimensions_too_large"


class ImageTooSmallError(ClipError):
    code = "image_too_small"


class ImageAspectRatioError(ClipError):
    """Too long and thin: the resize to the model's input would need more memory than the image
    itself (its short side is scaled up to the input side, its long side with it)."""

    code = "image_aspect_ratio_too_large"


class ImageTooManyScansError(ClipError):
    """A progressive JPEG with more scans than allowed: each scan is a pass over the whole image,
    so thousands of them in a small file cost seconds of decoding."""

    code = "image_too_many_scans"


class EmptyTextError(ClipError):
    code = "empty_text"


class InvalidTextError(ClipError):
    code = "invalid_text"


class TextTooLongError(ClipError):
    code = "text_too_long"


class TooManyItemsError(ClipError):
    code = "too_many_items"


class RequestTooLargeError(ClipError):
    code = "request_too_large"


class UrlNotAllowedError(ClipError):
    """A URL refused by policy: scheme, credentials, allow-list, or a non-public address."""

    code = "url_not_allowed"


class InvalidUrlError(ClipError):
    """An image URL that does not parse: a bad IPv6 literal, port or host name label."""

    code = "invalid_url"


class UrlFetchFailedError(ClipError):
    """An allowed URL could not be fetched: DNS, connection, timeout, HTTP status, redirects."""

    code = "url_fetch_failed"


class UnauthorizedError(ClipError):
    code = "unauthorized"


class UnknownModelError(ClipError):
    code = "unknown_model"


class ModelNotReadyError(ClipError):
    code = "model_not_ready"


class ModelStoreError(ClipError):
    """A model store entry is missing, malformed, or fails its integrity check."""

    code = "model_store_error"


class WeightsUnavailableError(ClipError):
    """Pretrained weights cannot be fetched (offline, unknown tag, download failure)."""

    code = "weights_unavailable"


class OverloadedError(ClipError):
    """More work than the service accepts at once: shed at once, the client retries later."""

    code = "overloaded"


class RuntimeSetupError(RuntimeError):
    """A ``CLIP_RUNTIME`` / ``CLIP_PRECISION`` this machine cannot run as asked (refused at start,
    never degraded to a slow path); the message says what to set instead."""
