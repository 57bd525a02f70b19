"""The documentation holds together: every relative link in the README and docs/ resolves (the
file, and the heading an ``#anchor`` names), and the README stays a five-minute read, free of
figures that date (those belong in docs/benchmarks.md and docs/reliability.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_BYTES = 15_000

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(path: Path) -> str:
    """The file without its code blocks (a ``# comment`` in a shell block is no heading)."""
    return _FENCE.sub("", path.read_text())


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces to
    hyphens, and -1, -2, ... for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_prose(path)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_prose(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: path.name)
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## The `setting`, measured\n")
    page.write_text(
        "# Page\n\n```bash\n# not a heading\n```\n[ok](other.md#the-setting-measured) "
        "[self](#page) [gone](missing.md) [bad](other.md#nope) [code](#not-a-heading) "
        "[web](https://example.com/x)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nope: no heading #nope in other.md",
        "#not-a-heading: no heading #not-a-heading in page.md",
    ]


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_readme_has_no_dated_figures() -> None:
    """Dates, commit hashes, machine descriptions and timings go stale: they live in docs/."""
    text = README.read_text()
    dated = re.findall(
        r"\b20\d\d-\d\d-\d\d\b|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"
        r"|\b\d+-core\b|\b\d+ min \d+ s\b",
        text,
    )
    assert dated == []


def test_readme_starts_with_the_commands_to_try_it() -> None:
    """The first commands a reader meets are the offline demo and the real service, then a
    request against the sample image that ships in the repository."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks[0].startswith("make serve-demo") and blocks[1].startswith("make serve ")
    sample = re.search(r"@(\S+\.jpg)", blocks[2])
    assert sample is not None and (ROOT / sample.group(1)).is_file()
