"""Forms are checked before BentoML's deserialiser: file fields take files only, bounded parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import bentoml
import httpx
import pytest

from clip_service.multipart_guard import (
    MAX_FILENAME_BYTES,
    MAX_PARTS,
    MultipartRefused,
    check_form,
    file_fields_by_route,
    takes_text,
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


def test_a_part_the_route_does_not_declare_is_refused_by_name() -> None:
    """A binary file under another name reached BentoML's json.loads (a 500); a text one the
    model's extra="forbid". Both are refused here, naming the field and the route's fields."""
    declared = ("image", "text", "model")
    for part in (("cat.jpg", b"\xff\xd8\xff\xe0"), (None, b"a")):
        content_type, body = encoded(file=part, text=(None, b"a"))
        with pytest.raises(MultipartRefused, match=r"unknown form field 'file' \(fields: image"):
            check_form(content_type, body, FILE_FIELDS, declared)
    content_type, body = encoded(**{"x" * 10_000: (None, b"a")})
    with pytest.raises(MultipartRefused) as refused:
        check_form(content_type, body, FILE_FIELDS, declared)
    assert len(str(refused.value)) < 200  # the name is echoed cut short
    content_type, body = encoded(image=("x.jpg", b"\xff"), text=(None, b"a"), model=(None, b"m"))
    check_form(content_type, body, FILE_FIELDS, declared)


def test_file_names_too_long_for_a_temporary_file_or_with_nul_are_refused() -> None:
    longest = "x" * (MAX_FILENAME_BYTES - 4) + ".jpg"
    content_type, body = encoded(image=(longest, b"\xff"), text=(None, b"a"))
    check_form(content_type, body, FILE_FIELDS)
    content_type, body = encoded(image=("x" * 255 + ".jpg", b"\xff"), text=(None, b"a"))
    with pytest.raises(MultipartRefused, match=f"at most {MAX_FILENAME_BYTES}"):
        check_form(content_type, body, FILE_FIELDS)
    disposition = b'Content-Disposition: form-data; name="image"; filename="a\x00b"'
    nul = b"--b\r\n" + disposition + b"\r\n\r\nx\r\n--b--\r\n"
    with pytest.raises(MultipartRefused, match="NUL"):
        check_form(b"multipart/form-data; boundary=b", nul, FILE_FIELDS)


@pytest.mark.parametrize(
    ("annotation", "text"),
    [
        (str, True),
        (str | None, True),
        (Optional[str], True),  # noqa: UP045 - the typing form is what older code writes
        (Literal["a", "b"], True),
        (Literal["a", "b"] | None, True),
        (int, False),
        (list[str], False),
        (list[str] | None, False),
        (str | int, False),
        (Literal[1, 2], False),
    ],
)
def test_string_fields_take_form_values_as_text(annotation: Any, text: bool) -> None:
    assert takes_text(annotation) is text
