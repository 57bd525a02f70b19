"""The JSON ``image`` field (base64 or a ``data:`` URI) to bytes.

Torch-free on purpose: ``clip-eval --engine remote`` reads dataset cells with it on machines that
install no torch.
"""

from __future__ import annotations

import base64
import binascii
import re

from clip_runtime.errors import ImageTooLargeError, InvalidImageError, UrlNotAllowedError

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# What a file path has and base64 never does: a dot before a short suffix, a backslash, ``~/``.
_FILE_PATH = re.compile(r"(\.[A-Za-z0-9]{1,5}\s*$)|\\|^\s*(~|\.{1,2})/", re.ASCII)
IMAGE_FIELD_FORMS = (
    "image must be base64, a data: URI or an http(s) URL; to send a file, use the upload "
    "endpoint (/evaluator/v1/evaluation/single/upload, multipart)"
)
# A URI scheme (``file:``, ``ftp:``, ...): never base64, whose alphabet has no colon.
_URI_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]{0,31}):", re.IGNORECASE)


def is_url(value: str) -> bool:
    return value.lstrip()[:8].lower().startswith(("http://", "https://"))


def decode_image_field(value: str, max_image_bytes: int) -> bytes:
    """Base64 (standard or URL-safe, padding and line breaks optional) or a ``data:`` URI."""
    payload = value.strip()
    match = _DATA_URI.match(payload)
    if match:
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise InvalidImageError(f"data URI has media type {mime!r}, not an image")
        if ";base64" not in match.group("params").lower():
            raise InvalidImageError("data URI must be base64-encoded (data:image/...;base64,...)")
        payload = payload[match.end() :]
    elif is_url(payload):
        raise InvalidImageError("image URLs are fetched by the caller of decode_image_field")
    elif (scheme := _URI_SCHEME.match(payload)) and len(scheme.group("scheme")) == 1:
        raise InvalidImageError(f"image looks like a file path: {IMAGE_FIELD_FORMS}")  # C:\\...
    elif (scheme := _URI_SCHEME.match(payload)) and scheme.group("scheme").lower() != "data":
        raise UrlNotAllowedError(
            f"URL scheme {scheme.group('scheme').lower()!r} is not allowed; use http(s)"
        )
    if len(payload) * 3 // 4 <= max_image_bytes:
        # The common case, standard padded base64 on one line, in one C pass; the regex and the
        # alphabet checks below cost more than the decode itself (docs/reliability.md).
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            pass
        else:
            if data:
                return data
    try:
        return _decode_lenient_base64(payload, max_image_bytes)
    except InvalidImageError as error:
        if _FILE_PATH.search(value):
            raise InvalidImageError(f"image looks like a file path: {IMAGE_FIELD_FORMS}") from error
        raise


def _decode_lenient_base64(payload: str, max_image_bytes: int) -> bytes:
    """Base64 with line breaks, URL-safe characters or missing padding."""
    payload = _WHITESPACE.sub("", payload)
    if not payload:
        raise InvalidImageError("image is empty")
    if len(payload) * 3 // 4 > max_image_bytes:
        raise ImageTooLargeError(f"image is larger than {max_image_bytes} bytes")
    payload += "=" * (-len(payload) % 4)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    try:
        data = base64.b64decode(payload, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"image is not valid base64 ({exc}): {IMAGE_FIELD_FORMS}") from exc
    if not data:
        raise InvalidImageError("image is empty")
    return data
