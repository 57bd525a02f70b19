"""Image references in dataset cells -> image bytes.

A cell holds a local path (relative ones are taken from the image root, by default the input
file's folder), an http(s) URL (fetched by the service's own SSRF-guarded fetcher,
``clip_runtime.fetch``, with its policy and error codes), base64 or a ``data:`` URI, raw bytes
(Parquet binary columns), or a Hugging Face-style ``{"bytes": ..., "path": ...}`` struct.
Failures are per-pair ``ClipError``s with stable codes; the run goes on. Decoding the bytes is
the engine's job, not this module's.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_eval.cli_errors import ImageNotFoundError, ImageUnreadableError
from clip_eval.records import LoadedPair, Pair, is_missing
from clip_runtime.errors import ClipError, ImageTooLargeError, InvalidRequestError
from clip_runtime.fetch import FetchPolicy, fetch_image_bytes_sync
from clip_runtime.image_field import decode_image_field

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Base64 without a data: prefix; paths short enough to be paths are tried as files first.
_BASE64 = re.compile(r"^[A-Za-z0-9+/_=\s-]+$")
_MIN_BASE64_CHARS = 64


@dataclass(frozen=True)
class LoaderConfig:
    """Picklable, so Ray workers build the same loader."""

    image_root: Path
    fetch_timeout_s: float = 10.0
    max_image_bytes: int = 16 * 1024 * 1024
    allow_urls: bool = True
    # Empty: any public host (never loopback, private or link-local); else only these.
    url_allowed_hosts: tuple[str, ...] = ()
    url_max_redirects: int = 3

    def fetch_policy(self) -> FetchPolicy:
        """The service's URL policy, with ``--fetch-timeout`` as the whole fetch's deadline."""
        return FetchPolicy(
            enabled=self.allow_urls,
            allowed_hosts=self.url_allowed_hosts,
            max_bytes=self.max_image_bytes,
            connect_timeout_s=min(self.fetch_timeout_s, 5.0),
            read_timeout_s=self.fetch_timeout_s,
            total_timeout_s=self.fetch_timeout_s,
            max_redirects=self.url_max_redirects,
        )


def as_transportable(value: Any) -> str | None:
    """The reference as text (raw bytes become a ``data:`` URI): what Ray ships to workers, so
    that a column never mixes str and bytes."""
    if is_missing(value):
        return None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray | memoryview):
        return "data:;base64," + base64.b64encode(bytes(value)).decode("ascii")
    return None if value is None else str(value)


def local_path(value: Any, config: LoaderConfig) -> Path | None:
    """The file a cell would be read from, if it names one (not a URL, ``data:`` URI or bytes)."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text[:5].lower() == "data:" or _SCHEME.match(text):
        return None
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~user" of an unknown user
        return None
    return path if path.is_absolute() else config.image_root / path


class ImageLoader:
    """Thread-safe: each URL is fetched on its own (as the service fetches it)."""

    def __init__(self, config: LoaderConfig) -> None:
        self.config = config
        self.fetch_policy = config.fetch_policy()

    def close(self) -> None:
        """Nothing held between loads; kept so engines close every loader the same way."""

    def load(self, value: Any) -> bytes:
        """The image bytes a cell refers to, or a ``ClipError`` with the reason."""
        if isinstance(value, dict):  # Hugging Face datasets' Image feature
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            if not data:
                raise InvalidRequestError("image is missing")
            return data
        if is_missing(value) or not isinstance(value, str) or not value.strip():
            raise InvalidRequestError("image is missing")
        text = value.strip()
        if text[:5].lower() == "data:":
            return decode_image_field(text, self.config.max_image_bytes)
        if _SCHEME.match(text):  # other schemes than http(s) are refused there: url_not_allowed
            return fetch_image_bytes_sync(text, self.fetch_policy)
        path = local_path(text, self.config)
        if path is not None and _exists(path):
            return self._read(path)
        if len(text) >= _MIN_BASE64_CHARS and _BASE64.match(text):
            return decode_image_field(text, self.config.max_image_bytes)
        raise ImageNotFoundError(f"image file not found: {path or text}")

    def load_pair(self, pair: Pair) -> LoadedPair | ClipError:
        """Image bytes and texts ready to score, or the error that stops this pair."""
        try:
            if pair.caption is None:
                raise InvalidRequestError("text is missing")
            image_2 = None if pair.image_2 is None else self.load(pair.image_2)
            return LoadedPair(
                self.load(pair.image), pair.caption, pair.references, image_2, pair.text_2
            )
        except ClipError as error:
            return error

    def _read(self, path: Path) -> bytes:
        limit = self.config.max_image_bytes
        try:
            if not path.is_file():
                raise ImageUnreadableError(f"image path {path} is not a regular file")
            if path.stat().st_size > limit:
                raise ImageTooLargeError(f"image file {path} is larger than {limit} bytes")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageNotFoundError(f"image file not found: {path}") from exc
        except OSError as exc:
            raise ImageUnreadableError(f"cannot read image file {path}: {exc}") from exc


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # base64 text is no path: name too long, NUL byte, ...
        return False
