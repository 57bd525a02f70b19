"""A corpus of malformed and hostile inputs, each with the exact answer the service must give.

Run it against any running service (it only talks to the URL given, default 127.0.0.1):

    python tests/hostile_inputs.py http://127.0.0.1:3000

The server must use the limits the test suite sets (CLIP_MAX_REQUEST_BYTES=8 MiB,
CLIP_MAX_BATCH_ITEMS=32); after the corpus it must still answer /readyz with 200.
"""

from __future__ import annotations

import base64
import io
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from clip_testkit.routes import BATCH, SINGLE, UPLOAD


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_part(image: bytes) -> tuple[str, tuple[str, bytes, str]]:
    return ("image", ("x.jpg", image, "image/jpeg"))


# Image URLs that do not parse: a bad IPv6 literal, port or host label.
MALFORMED_URLS = (
    "http://[x]/a.jpg",
    "http://[::1/a.jpg",
    "http://example.com:99999/a.jpg",
    "http://example.com:-1/a.jpg",
    "http://a..example.com/a.jpg",
    "http://" + "a" * 300 + ".example.com/a.jpg",
)


def many_scan_jpeg(width: int, height: int, scans: int) -> bytes:
    """A progressive JPEG of one colour with its smallest scan repeated to ``scans`` in all: a
    few KB, and every scan a pass of the decoder over the whole image."""
    progressive = _encode(
        Image.new("RGB", (width, height), (120, 80, 40)), "JPEG", progressive=True
    )
    end = progressive.rindex(b"\xff\xd9")
    starts = [i for i in range(len(progressive) - 1) if progressive[i : i + 2] == b"\xff\xda"]
    pieces = [progressive[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
    smallest = min(pieces, key=len)
    return progressive[:end] + smallest * (scans - len(pieces)) + progressive[end:]


@dataclass
class Case:
    name: str
    status: int
    code: str | None  # None: a 200 is expected
    json: Any = None
    content: bytes | None = None
    path: str = SINGLE
    files: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    item_codes: list[str | None] | None = None  # for batch answers with per-item errors
    files_list: list[tuple[str, Any]] | None = None  # multipart parts, text ones as (None, value)
    absent: tuple[str, ...] = ()  # must not appear in the answer (echoes, internals)
    message: tuple[str, ...] = ()  # must appear in the error message (what to fix)


def build_cases() -> list[Case]:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    jpeg = _encode(photo, "JPEG", quality=85)
    good = _b64(jpeg)
    bomb = _encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 M pixels in a few KB
    return [
        *_undecodable_image_cases(jpeg, bomb, photo),
        *_request_field_cases(good),
        *_string_content_cases(good),
        *_json_shape_cases(good),
        *_image_format_and_size_cases(photo),
        *_url_cases(),
        *_work_limit_cases(good),
        *_batch_item_cases(good, bomb),
        *_multipart_shape_cases(jpeg),
        *_upload_field_cases(jpeg),
    ]


def _undecodable_image_cases(jpeg: bytes, bomb: bytes, photo: Image.Image) -> list[Case]:
    """Image bytes that do not decode as an image, or decode to far too many pixels."""
    polyglot = _encode(photo, "GIF") + b"<script>alert(1)</script>PK\x03\x04"
    wrong_magic = b"\x89PNX" + _encode(photo, "PNG")[4:]
    return [
        Case(
            "truncated JPEG",
            422,
            "invalid_image",
            {"image": _b64(jpeg[: len(jpeg) // 2]), "text": "a"},
        ),
        Case("zero bytes", 422, "invalid_image", {"image": "", "text": "a"}),
        Case(
            "decompression bomb PNG",
            413,
            "image_dimensions_too_large",
            {"image": _b64(bomb), "text": "a"},
        ),
        Case(
            "huge dimensions, tiny file",
            413,
            "image_dimensions_too_large",
            {"image": _b64(png_header_only(100_000, 100_000)), "text": "a"},
        ),
        Case(
            "GIF/HTML/ZIP polyglot decodes as its image",
            200,
            None,
            {"image": _b64(polyglot), "text": "a"},
        ),
        Case("wrong magic", 422, "invalid_image", {"image": _b64(wrong_magic), "text": "a"}),
        Case("bad base64", 422, "invalid_image", {"image": "!!!not base64!!!", "text": "a"}),
        Case(
            "a local file path as image",
            422,
            "invalid_image",
            {"image": "/home/me/cat.jpg", "text": "a"},
            message=("file path", "base64, a data: URI or an http(s) URL", "upload endpoint"),
        ),
    ]


def _request_field_cases(good: str) -> list[Case]:
    """Missing, mistyped and misspelt fields, and JSON sent as a form."""
    return [
        Case(
            "a missing and a mistyped field, named",
            400,
            "invalid_request",
            {"image": 5},
            message=("text: field required", "image: "),
            absent=("validation error for",),
        ),
        Case(
            "a misspelt field is refused, naming the real ones",
            400,
            "invalid_request",
            {"image": good, "caption": "a cat"},
            message=("unknown field 'caption'", "image, text, model, references, scale"),
        ),
        Case(
            "a misspelt field in a batch item",
            400,
            "invalid_request",
            {"items": [{"image": good, "caption": "a cat"}]},
            path=BATCH,
            message=("unknown field 'items[0].caption'",),
        ),
        Case(
            "JSON sent with curl -d's form content type",
            400,
            "invalid_request",
            content=b'{"image": "' + good.encode() + b'", "text": "a cat"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
            message=("Content-Type: application/json",),
        ),
    ]


def _string_content_cases(good: str) -> list[Case]:
    """Image strings that are not base64 or an image data: URI, and captions of every kind."""
    return [
        Case("base64 padding inside", 422, "invalid_image", {"image": "AB=CD", "text": "a"}),
        Case(
            "data URI with a non-image type",
            422,
            "invalid_image",
            {"image": "data:text/html;base64," + good, "text": "a"},
        ),
        Case(
            "data URI without base64",
            422,
            "invalid_image",
            {"image": "data:image/png,abc", "text": "a"},
        ),
        Case(
            "text of 100k characters", 422, "text_too_long", {"image": good, "text": "a" * 100_000}
        ),
        Case("control characters", 200, None, {"image": good, "text": "a\x01b\x1b[31m cat\x7f"}),
        Case("emoji", 200, None, {"image": good, "text": "🐱🐶 a cat and a dog 🌅"}),
        Case(
            "right-to-left text", 200, None, {"image": good, "text": "قطة على الأريكة \u202e שלום"}
        ),
        Case("NUL bytes in text", 422, "invalid_text", {"image": good, "text": "a cat\x00"}),
        Case("empty text", 422, "empty_text", {"image": good, "text": ""}),
        Case("blank text", 422, "empty_text", {"image": good, "text": " \n\t "}),
    ]


def _json_shape_cases(good: str) -> list[Case]:
    """Bodies that are not the expected JSON object, and values that must not be echoed."""
    nested = ("[" * 5000 + "]" * 5000).encode()
    deep_object = ('{"image": ' * 3000 + '"x"' + "}" * 3000).encode()
    return [
        Case("deeply nested JSON array", 400, "invalid_request", content=nested),
        Case("deeply nested JSON object", 400, "invalid_request", content=deep_object),
        Case("not JSON", 400, "invalid_request", content=b"hello there"),
        Case(
            "JSON array at top level", 400, "invalid_request", json=[{"image": good, "text": "a"}]
        ),
        Case("text is a number", 400, "invalid_request", {"image": good, "text": 5}),
        Case("image is a list", 400, "invalid_request", {"image": [good], "text": "a"}),
        Case(
            "model is an object", 400, "invalid_request", {"image": good, "text": "a", "model": {}}
        ),
        Case("missing everything", 400, "invalid_request", {}),
        Case("missing text", 400, "invalid_request", {"image": good}),
        Case(
            "unknown model is not echoed whole",
            422,
            "unknown_model",
            {"image": good, "text": "a", "model": "x" * 5000},
            absent=("x" * 100,),
        ),
        Case(
            "validation errors carry no pydantic URL or input",
            400,
            "invalid_request",
            {"image": good, "text": "a", "scale": "y" * 5000},
            absent=("pydantic.dev", "y" * 100),
        ),
    ]


def _image_format_and_size_cases(photo: Image.Image) -> list[Case]:
    """Large, deep, tiny and unsupported images, and a body over the request limit."""
    deep_png = _encode(Image.new("I;16", (6300, 6300), 40_000), "PNG")  # ~80 KB, 80 MB decoded
    return [
        Case("16-bit 6300x6300 PNG", 200, None, {"image": _b64(deep_png), "text": "a"}),
        Case(
            "4000x3000 JPEG (decoded at a reduced DCT scale)",
            200,
            None,
            {"image": _b64(_encode(photo.resize((4000, 3000)), "JPEG", quality=80)), "text": "a"},
        ),
        Case(
            "ICO image",
            415,
            "unsupported_image_format",
            {"image": _b64(_encode(photo, "ICO")), "text": "a"},
        ),
        Case(
            "SVG image",
            415,
            "unsupported_image_format",
            {"image": _b64(b'<svg xmlns="http://www.w3.org/2000/svg"></svg>'), "text": "a"},
        ),
        Case(
            "one-pixel image",
            422,
            "image_too_small",
            {"image": _b64(_encode(Image.new("RGB", (1, 1)), "PNG")), "text": "a"},
        ),
        Case(
            "body over the request limit",
            413,
            "request_too_large",
            {"image": "A" * (9 * 1024 * 1024), "text": "a"},
        ),
    ]


def _url_cases() -> list[Case]:
    """Image URLs the service must refuse to fetch."""
    return [
        Case(
            "URL to loopback",
            422,
            "url_not_allowed",
            {"image": "http://127.0.0.1:1/x.jpg", "text": "a"},
        ),
        Case(
            "URL refusal does not say what a name resolves to",
            422,
            "url_not_allowed",
            {"image": "http://localhost:1/x.jpg", "text": "a"},
            absent=("127.0.0.1", "::1"),
        ),
        Case(
            "URL to cloud metadata",
            422,
            "url_not_allowed",
            {"image": "http://169.254.169.254/latest/meta-data/", "text": "a"},
        ),
        Case(
            "URL to IPv4-mapped IPv6 loopback",
            422,
            "url_not_allowed",
            {"image": "http://[::ffff:127.0.0.1]/x.jpg", "text": "a"},
        ),
        Case(
            "URL with credentials",
            422,
            "url_not_allowed",
            {"image": "http://user:pw@example.com/x.jpg", "text": "a"},
        ),
        *(
            Case(f"{url.split(':')[0]} URL", 422, "url_not_allowed", {"image": url, "text": "a"})
            for url in ("file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://example.com/a")
        ),
    ]


def _work_limit_cases(good: str) -> list[Case]:
    """Inputs cheap to send and costly to process, refused by a named CLIP_MAX_* limit."""
    ten_k = {"items": [{"image": "AAAA", "text": "x"}] * 10_000}
    return [
        Case("10k-item batch", 413, "too_many_items", ten_k, path=BATCH),
        Case(
            "a 4x50000 PNG (would resize to 224x2800000)",
            422,
            "image_aspect_ratio_too_large",
            {"image": _b64(png_header_only(4, 50_000)), "text": "a"},
            message=("CLIP_MAX_IMAGE_ASPECT_RATIO",),
        ),
        Case(
            "100,000 references, counted before any is tokenized",
            413,
            "too_many_items",
            {"image": good, "text": "a", "references": ["a cat"] * 100_000},
            message=("CLIP_MAX_REFERENCES",),
        ),
        Case(
            "a word of 9,000 letters (seconds of BPE)",
            422,
            "text_too_long",
            {"image": good, "text": "a " + "qxz" * 3_000},
            message=("CLIP_MAX_TEXT_WORD_CHARS",),
        ),
        Case(
            "a progressive JPEG of 2,000 scans",
            422,
            "image_too_many_scans",
            {"image": _b64(many_scan_jpeg(1000, 1000, 2000)), "text": "a"},
            message=("CLIP_MAX_JPEG_SCANS",),
        ),
    ]


def _batch_item_cases(good: str, bomb: bytes) -> list[Case]:
    """Batches whose bad items are per-item errors, not a failed request."""
    return [
        Case(
            "batch items with URLs that do not parse",
            200,
            None,
            path=BATCH,
            json={
                "items": [
                    {"image": good, "text": "a"},
                    *({"image": url, "text": "a"} for url in MALFORMED_URLS),
                ]
            },
            item_codes=[None] + ["invalid_url"] * len(MALFORMED_URLS),
        ),
        Case("batch items is a string", 400, "invalid_request", {"items": "abc"}, path=BATCH),
        Case(
            "batch with hostile items among good ones",
            200,
            None,
            path=BATCH,
            json={
                "items": [
                    {"image": good, "text": "a"},
                    {"image": _b64(bomb), "text": "a"},
                    {"image": good, "text": "a\x00"},
                    {"image": "data:text/plain;base64,AA==", "text": "a"},
                ]
            },
            item_codes=[None, "image_dimensions_too_large", "invalid_text", "invalid_image"],
        ),
    ]


def _multipart_shape_cases(jpeg: bytes) -> list[Case]:
    """Uploads (and a JSON request) whose multipart form is malformed or incomplete."""
    no_boundary = {"content-type": "multipart/form-data"}
    form_body = b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\na\r\n--b--\r\n'
    return [
        Case(
            "upload of a non-image file",
            422,
            "invalid_image",
            path=UPLOAD,
            files={"image": ("x.jpg", b"MZ\x90\x00 not an image", "image/jpeg")},
            data={"text": "a"},
        ),
        Case(
            "upload with the image as a text value (BentoML would fetch it as a URL)",
            400,
            "invalid_request",
            path=UPLOAD,
            files_list=[("image", (None, "http://127.0.0.1:1/x.jpg")), ("text", (None, "a"))],
        ),
        Case(
            "upload without a multipart boundary",
            400,
            "invalid_request",
            path=UPLOAD,
            content=form_body,
            headers=no_boundary,
        ),
        Case(
            "JSON endpoint sent multipart without a boundary",
            400,
            "invalid_request",
            content=form_body,
            headers=no_boundary,
        ),
        Case(
            "upload with 1,001 form fields",
            400,
            "invalid_request",
            path=UPLOAD,
            files_list=[(f"f{i}", (None, "v")) for i in range(1001)],
        ),
        Case(
            "upload without a caption",
            400,
            "invalid_request",
            path=UPLOAD,
            files={"image": ("x.jpg", jpeg, "image/jpeg")},
        ),
    ]


def _upload_field_cases(jpeg: bytes) -> list[Case]:
    """Upload fields under the wrong name, too long, or not what they seem; and a good upload."""
    return [
        Case(
            "upload with the image under another name (BentoML ran json.loads on it: a 500)",
            400,
            "invalid_request",
            path=UPLOAD,
            files_list=[("file", ("x.jpg", jpeg, "image/jpeg")), ("text", (None, "a"))],
            message=("unknown form field 'file'", "fields: image, text"),
        ),
        Case(
            "upload with an undeclared text field",
            400,
            "invalid_request",
            path=UPLOAD,
            files_list=[image_part(jpeg), ("text", (None, "a")), ("caption", (None, "a"))],
            message=("unknown form field 'caption'",),
        ),
        Case(
            "upload with a file name too long for a temporary file",
            400,
            "invalid_request",
            path=UPLOAD,
            files_list=[("image", ("x" * 300 + ".jpg", jpeg, "image/jpeg")), ("text", (None, "a"))],
            message=("file name", "at most 200"),
        ),
        Case(
            "upload with a caption of 100,000 [ (RecursionError in json.loads)",
            422,
            "text_too_long",
            path=UPLOAD,
            files_list=[image_part(jpeg), ("text", (None, "[" * 100_000))],
        ),
        Case(
            "upload with a model of 100,000 [",
            422,
            "unknown_model",
            path=UPLOAD,
            files_list=[image_part(jpeg), ("text", (None, "a")), ("model", (None, "[" * 100_000))],
            absent=("[" * 1000,),
        ),
        Case(
            "upload with a caption that is JSON (text, not a number)",
            200,
            None,
            path=UPLOAD,
            files_list=[image_part(jpeg), ("text", (None, "123"))],
        ),
        Case(
            "upload as a urlencoded form (BentoML would download the image as a URL)",
            415,
            "unsupported_media_type",
            path=UPLOAD,
            content=b"image=http%3A%2F%2F127.0.0.1%3A1%2Fx.jpg&text=a",
            headers={"content-type": "application/x-www-form-urlencoded"},
            message=("multipart/form-data",),
        ),
        Case(
            "upload as JSON",
            415,
            "unsupported_media_type",
            path=UPLOAD,
            content=b'"http://127.0.0.1:1/x.jpg"',
        ),
        Case(
            "upload of a real image",
            200,
            None,
            path=UPLOAD,
            files={"image": ("x.jpg", jpeg, "image/jpeg")},
            data={"text": "a cat"},
        ),
    ]


def check(client: httpx.Client, case: Case) -> str | None:
    """None when the service answered as expected, else what went wrong."""
    headers = dict(case.headers)
    if case.content is not None:
        headers.setdefault("content-type", "application/json")
    response = client.post(
        case.path,
        json=case.json if case.content is None and not (case.files or case.files_list) else None,
        content=case.content,
        files=case.files or case.files_list,
        data=case.data,
        headers=headers,
    )
    if response.status_code != case.status:
        return f"status {response.status_code}, expected {case.status}: {response.text[:300]}"
    if "Traceback" in response.text:
        return "a stack trace reached the client"
    leaked = [text[:20] for text in case.absent if text in response.text]
    if leaked:
        return f"the answer contains {leaked}: {response.text[:200]}"
    body = response.json()
    if case.code is not None:
        error = body.get("error") or {}
        if error.get("code") != case.code:
            return f"code {error.get('code')!r}, expected {case.code!r}"
        if not error.get("message") or not error.get("request_id"):
            return "error without message or request_id"
        missing = [text for text in case.message if text not in error["message"]]
        if missing:
            return f"message {error['message']!r} lacks {missing}"
    if case.item_codes is not None:
        codes = [(r["error"] or {}).get("code") for r in body["results"]]
        if codes != case.item_codes:
            return f"item codes {codes}, expected {case.item_codes}"
    return None


def run(url: str) -> list[str]:
    failures: list[str] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for case in build_cases():
            problem = check(client, case)
            if problem:
                failures.append(f"{case.name}: {problem}")
        ready = client.get("/readyz")
        if ready.status_code != 200:
            failures.append(f"/readyz answered {ready.status_code} after the corpus")
    return failures


# The costliest cases, sent together while /readyz is probed (issue 21: probes stay fast).
HEAVIEST = (
    "a 4x50000 PNG",
    "100,000 references",
    "a progressive JPEG of 2,000 scans",
    "a word of 9,000 letters",
)


def readyz_while_heaviest_in_flight(url: str, rounds: int = 3) -> tuple[list[float], list[str]]:
    """Send the heaviest cases ``rounds`` times each, all at once, and probe /readyz until they
    are answered: the probes' durations (s), and what went wrong with the cases."""
    cases = [case for case in build_cases() if case.name.startswith(HEAVIEST)] * rounds
    probes: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(check, client, case) for case in cases]
        while not all(answer.done() for answer in answers):
            started = time.perf_counter()
            ready = client.get("/readyz", timeout=10)
            probes.append(time.perf_counter() - started if ready.status_code == 200 else 99.0)
            time.sleep(0.05)
    results = [answer.result() for answer in answers]
    problems = [f"{c.name}: {r}" for c, r in zip(cases, results, strict=True) if r is not None]
    return probes, problems


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000"
    problems = run(target)
    cases = len(build_cases())
    print("\n".join(problems) or f"all {cases} hostile inputs answered as expected")
    print(f"{cases - len(problems)} passed, {len(problems)} failed")
    sys.exit(1 if problems else 0)
