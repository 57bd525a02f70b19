"""Forms are checked before BentoML's deserialiser: file fields take files only, bounded parts."""

from __future__ import annotations

from pathlib import Path

import bentoml
import httpx
import pytest

from clip_service.multipart_guard import (
    MAX_PARTS,
    MultipartRefused,
    check_form,
    file_fields_by_route,
)

FILE_FIELDS = frozenset({"image"})


def encoded(**fields: tuple[str | None, bytes]) -> tuple[bytes, bytes]:
    """A multipart body; a filename of None makes a text part (no ``filename`` parameter)."""
    request = httpx.Request("POST", "http://x/", files=list(fields.items()))
    return request.headers["content-type"].encode(), request.read()


def test_a_file_part_passes() -> None:
    content_type, body = encoded(image=("x.jpg", b"\xff\xd8"), text=(None, b"a"))
    check_form(content_type, body, FILE_FIELDS)


def test_a_text_value_for_a_file_field_is_refused() -> None:
    content_type, body = encoded(image=(None, b"http://169.254.169.254/"), text=(None, b"a"))
    with pytest.raises(MultipartRefused, match="'image' must be a file upload"):
        check_form(content_type, body, FILE_FIELDS)
    check_form(content_type, body, frozenset())  # on a route without file fields it is text


def test_missing_boundary_and_malformed_bodies_are_refused() -> None:
    with pytest.raises(MultipartRefused, match="boundary"):
        check_form(b"multipart/form-data", b"--x\r\n", FILE_FIELDS)
    with pytest.raises(MultipartRefused, match="malformed"):
        check_form(b"multipart/form-data; boundary=abc", b"--abc\r\nnot a header line", FILE_FIELDS)


def test_too_many_parts_are_refused() -> None:
    content_type, body = encoded(**{f"f{i}": (None, b"v") for i in range(MAX_PARTS + 1)})
    with pytest.raises(MultipartRefused, match=f"more than {MAX_PARTS}"):
        check_form(content_type, body, FILE_FIELDS)
    content_type, body = encoded(**{f"f{i}": (None, b"v") for i in range(MAX_PARTS)})
    check_form(content_type, body, FILE_FIELDS)


def test_file_fields_come_from_bentoml_input_specs() -> None:
    """Fails when BentoML stops describing API inputs as a pydantic ``input_spec``."""

    @bentoml.service
    class Forms:
        @bentoml.api(route="/up")
        def up(self, image: Path, text: str, other: Path | None = None) -> str:
            return text

        @bentoml.api(route="/plain")
        def plain(self, image: str) -> str:
            return image

    assert file_fields_by_route(Forms.apis.values()) == {"/up": frozenset({"image", "other"})}
