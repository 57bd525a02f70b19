"""Product code never imports the tests or the test support package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ["service.py", "clip_runtime", "clip_service", "clip_eval", "scripts/save_models.py"]
TEST_ONLY = {"tests", "clip_testkit"}


def imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def product_files() -> list[Path]:
    files: list[Path] = []
    for entry in PRODUCT:
        path = ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def test_product_code_imports_no_test_code() -> None:
    files = product_files()
    assert len(files) > 20  # the packages were found
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_levels(path) & TEST_ONLY)
        for path in files
        if imported_top_levels(path) & TEST_ONLY
    }
    assert offenders == {}


def test_the_check_sees_an_import_of_test_code() -> None:
    assert imported_top_levels(ROOT / "scripts" / "benchmark.py") >= {"clip_testkit"}


def test_the_wheel_holds_every_product_package_and_no_test_support() -> None:
    """``[tool.setuptools] packages`` lists packages one by one: a new subpackage left out would
    be missing from the wheel; test support listed would ship."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    product = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for entry in PRODUCT
        if (ROOT / entry).is_dir()
        for init in (ROOT / entry).rglob("__init__.py")
    }
    assert listed == product
    assert not listed & TEST_ONLY
