"""Image references in dataset cells -> image bytes.

A cell holds a local path (relative ones are taken from the image root, by default the input
file's folder), an http(s) URL, base64 or a ``data:`` URI, raw bytes (Parquet binary columns), or
a Hugging Face-style ``{"bytes": ..., "path": ...}`` struct. Failures are per-pair ``ClipError``s
with stable codes; the run goes on. Decoding the bytes is the engine's job, not this module's.
"""

from __future__ import annotations

import base64
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from clip_eval.errors import (
    ImageFetchError,
    ImageNotFoundError,
    ImageUnreadableError,
    UnsupportedImageSourceError,
)
from clip_eval.records import Pair, is_missing
from clip_runtime.errors import ClipError, ImageTooLargeError, InvalidRequestError
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


class ImageLoader:
    """Thread-safe; one shared HTTP connection pool for URL images."""

    def __init__(self, config: LoaderConfig) -> None:
        self.config = config
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                timeout = self.config.fetch_timeout_s
                self._client = httpx.Client(
                    timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
                    follow_redirects=True,  # httpx refuses redirects to non-http(s) schemes
                    headers={"user-agent": "clip-eval"},
                )
            return self._client

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
        scheme = _SCHEME.match(text)
        if scheme:
            if scheme.group(1).lower() in {"http", "https"}:
                return self._fetch(text)
            raise UnsupportedImageSourceError(
                f"{scheme.group(1)}:// image references are not supported; "
                "use a local path, an http(s) URL or base64"
            )
        path = self._path(text)
        if path is not None and _exists(path):
            return self._read(path)
        if len(text) >= _MIN_BASE64_CHARS and _BASE64.match(text):
            return decode_image_field(text, self.config.max_image_bytes)
        raise ImageNotFoundError(f"image file not found: {path or text}")

    def load_pair(self, pair: Pair) -> tuple[bytes, str] | ClipError:
        """Bytes and caption ready to score, or the error that stops this pair."""
        try:
            if pair.caption is None:
                raise InvalidRequestError("text is missing")
            return self.load(pair.image), pair.caption
        except ClipError as error:
            return error

    def _path(self, text: str) -> Path | None:
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~user" of an unknown user
            return None
        return path if path.is_absolute() else self.config.image_root / path

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

    def _fetch(self, url: str) -> bytes:
        limit = self.config.max_image_bytes
        try:
            with self._http().stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageFetchError(f"GET {url} answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise ImageTooLargeError(f"image at {url} is larger than {limit} bytes")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > limit:  # a server may lie about, or omit, the length
                        raise ImageTooLargeError(f"image at {url} is larger than {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # base64 text is no path: name too long, NUL byte, ...
        return False
