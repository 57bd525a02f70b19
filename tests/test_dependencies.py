"""Every third-party module the project imports is a declared dependency, in the install that
runs it; the Bento's requirements are the runtime's; and the remote CLI imports without torch.

Imports are read from the source (AST, function-level imports included) and mapped to the
distributions that provide them in this environment (importlib.metadata).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIRST_PARTY = {
    "clip_runtime",
    "clip_service",
    "clip_eval",
    "clip_testkit",
    "service",
    "scripts",
    "load_tests",
    "tests",
}
PROJECT_NAME = PYPROJECT["project"]["name"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return canonical(match[0])


@cache
def declared(extra: str | None) -> frozenset[str]:
    """Distribution names an install of the project (with ``extra``) declares, self-references
    (``clip-score-service[cli]``) followed."""
    requirements = list(PYPROJECT["project"]["dependencies"])
    names: set[str] = set()
    pending = [extra] if extra else []
    seen: set[str] = set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for requirement in PYPROJECT["project"]["optional-dependencies"][current]:
            if requirement_name(requirement) == canonical(PROJECT_NAME):
                inner = re.search(r"\[(.*)\]", requirement)
                assert inner, requirement
                pending.extend(part.strip() for part in inner[1].split(","))
            else:
                requirements.append(requirement)
    names.update(requirement_name(requirement) for requirement in requirements)
    return frozenset(names)


def python_files(*places: str) -> list[Path]:
    files: list[Path] = []
    for place in places:
        path = ROOT / place
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    assert files, places
    return files


def imported_top_level(files: list[Path]) -> dict[str, set[Path]]:
    """Top-level module name -> the files importing it (absolute imports only)."""
    found: dict[str, set[Path]] = {}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(file.relative_to(ROOT))
    return found


def undeclared(files: list[Path], allowed: frozenset[str]) -> dict[str, str]:
    """Third-party modules imported by ``files`` whose distribution is not in ``allowed``."""
    providers = packages_distributions()
    missing: dict[str, str] = {}
    for module, importers in imported_top_level(files).items():
        if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
            continue
        distributions = {canonical(name) for name in providers.get(module, [])}
        where = sorted(map(str, importers))
        assert distributions, f"{module} (imported by {where}) is not installed"
        if not distributions & allowed:
            missing[module] = f"{sorted(distributions)} imported by {where}"
    return missing


# Which install runs which code: the service (and its Bento) has the runtime dependencies only.
RUNTIME_CODE = ("clip_runtime", "clip_service", "service.py")


@pytest.mark.parametrize(
    ("places", "extra"),
    [
        (RUNTIME_CODE, None),
        (("scripts/save_models.py",), None),  # `make save-models` runs on the runtime install
        (("clip_eval",), "ray"),  # the CLI with every engine: runtime + cli + ray
        (("scripts", "load_tests", "tests"), "dev"),
    ],
    ids=["service", "save-models", "clip-eval", "dev"],
)
def test_every_imported_module_is_declared(places: tuple[str, ...], extra: str | None) -> None:
    assert undeclared(python_files(*places), declared(extra)) == {}


def test_the_remote_cli_imports_only_its_extras() -> None:
    """What `make install-remote` installs (cli + remote, no base requirements) covers every
    module the remote path imports."""
    remote_path = [
        ROOT / "clip_eval" / name
        for name in (
            "cli.py",
            "compare.py",
            "datasets.py",
            "cli_errors.py",
            "image_cells.py",
            "output.py",
        )
    ] + [
        ROOT / "clip_eval" / name
        for name in ("pipeline.py", "records.py", "summary.py", "engines/remote.py")
    ]
    extras = PYPROJECT["project"]["optional-dependencies"]
    allowed = frozenset(requirement_name(r) for r in extras["cli"] + extras["remote"])
    runtime_modules = [
        ROOT / "clip_runtime" / f"{name}.py" for name in ("errors", "settings", "image_field")
    ]
    assert undeclared([*remote_path, *runtime_modules], allowed) == {}
    assert "torch" not in {requirement_name(r) for r in extras["cli"] + extras["remote"]}


def test_remote_cli_runs_with_torch_unimportable(tmp_path: Path) -> None:
    """The remote engine, the CLI and the compare mode import, and `clip-eval --help` runs, in a
    Python where `import torch` (and torchvision, open_clip) fails."""
    script = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'open_clip', 'ray'):\n"
        "    sys.modules[name] = None  # any import of it raises ImportError\n"
        "import clip_eval.engines.remote, clip_eval.compare, clip_eval.pipeline\n"
        "from clip_eval.cli import main\n"
        "sys.argv = ['clip-eval', '--help']\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--api-key" in result.stdout


def test_bento_requirements_are_the_runtime_dependencies() -> None:
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert sorted(bentofile["python"]["packages"]) == sorted(PYPROJECT["project"]["dependencies"])
