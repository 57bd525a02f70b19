"""Check a multipart/form-data body before BentoML's deserialiser sees it.

BentoML turns a *text* part sent for a ``Path`` field into a file by downloading the text as a
URL with its own client (``_bentoml_impl/serde.py``, ``MultipartSerde.ensure_file``), outside
our fetch policy; a body Starlette's form parser refuses (no boundary, over its 1,000 files or
fields) becomes a 500; a part the route does not declare reaches BentoML's ``json.loads`` (a
binary one is a ``UnicodeDecodeError``, a 500); and a filename longer than a file name may be
fails BentoML's temporary file (``ENAMETOOLONG``, a 500). All are client mistakes, so they are
refused here with a 4xx, parsing the body with python-multipart (the parser Starlette itself
uses).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

# Starlette refuses more than 1,000 files or 1,000 fields (a 500 in BentoML); stay under both.
MAX_PARTS = 1000
# BentoML stores an uploaded file as a temporary file named "tmp" + 8 characters + the upload's
# file name, and Linux refuses a name over 255 bytes (NAME_MAX): leave room for that prefix.
MAX_FILENAME_BYTES = 200
# How much of a client-sent field name an error message repeats.
MAX_ECHOED_NAME = 64


class MultipartRefused(Exception):
    """The body is not a form this service accepts; the message says why (no internals)."""


def is_multipart(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"multipart/form-data"


def _echo(name: str) -> str:
    return repr(name if len(name) <= MAX_ECHOED_NAME else name[:MAX_ECHOED_NAME] + "...")


def check_form(
    content_type: bytes,
    body: bytes,
    file_fields: frozenset[str],
    declared: tuple[str, ...] | None = None,
) -> None:
    """Raise ``MultipartRefused`` unless ``body`` is a well-formed form with at most
    ``MAX_PARTS`` parts in which every field named in ``file_fields`` is a file part, every file
    name is at most ``MAX_FILENAME_BYTES`` long without NUL, and (``declared`` given) every part
    is one of the route's ``declared`` fields."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise MultipartRefused("multipart/form-data without a boundary parameter")
    parts: list[dict[bytes, bytes]] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise MultipartRefused(f"more than {MAX_PARTS} form fields")
        parts.append({})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        if bytes(header_field).lower() == b"content-disposition":
            parts[-1].update(parse_options_header(bytes(header_value))[1])
        header_field.clear()
        header_value.clear()

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise MultipartRefused("the multipart body is malformed") from exc
    for part in parts:
        _check_part(part, file_fields, declared)


def _check_part(
    part: dict[bytes, bytes], file_fields: frozenset[str], declared: tuple[str, ...] | None
) -> None:
    name = part.get(b"name", b"").decode("latin-1")
    if declared is not None and name not in declared:
        raise MultipartRefused(f"unknown form field {_echo(name)} (fields: {', '.join(declared)})")
    if name in file_fields and b"filename" not in part:  # Starlette's own file test
        raise MultipartRefused(f"form field {_echo(name)} must be a file upload, not a text value")
    filename = part.get(b"filename", b"")
    if len(filename) > MAX_FILENAME_BYTES:
        raise MultipartRefused(
            f"the file name of form field {_echo(name)} has {len(filename)} bytes; "
            f"at most {MAX_FILENAME_BYTES} are accepted"
        )
    if b"\x00" in filename:
        raise MultipartRefused(f"the file name of form field {_echo(name)} contains a NUL byte")


def file_fields_by_route(apis: Iterable[Any]) -> dict[str, frozenset[str]]:
    """Route -> names of its ``Path``-typed inputs, from BentoML APIs' ``input_spec`` models."""
    fields: dict[str, frozenset[str]] = {}
    for api in apis:
        hints = api.input_spec.model_fields
        names = frozenset(
            name
            for name, info in hints.items()
            if info.annotation is Path or Path in typing.get_args(info.annotation)
        )
        if names:
            fields[api.route] = names
    return fields


def takes_text(annotation: Any) -> bool:
    """Whether a field of this type takes a plain string (``str``, string ``Literal``s, and
    unions of those with ``None``): a form value for it is the text itself, never JSON."""
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in args)
    if origin in (typing.Union, types.UnionType):
        kept = [arg for arg in args if arg is not type(None)]
        return bool(kept) and all(takes_text(arg) for arg in kept)
    return False
