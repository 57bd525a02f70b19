"""Product code never imports the tests or the test support package."""

from __future__ import annotations

import ast
import graphlib
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


PACKAGES = ("clip_runtime", "clip_service", "clip_eval")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside a function, that runs: those under
    ``if TYPE_CHECKING:`` never do."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        children = list(ast.iter_child_nodes(node))
        if _is_type_checking_block(node):
            assert isinstance(node, ast.If)
            children = node.orelse
        pending.extend(children)
    return found


def _imported_modules(
    node: ast.Import | ast.ImportFrom, module: str, known: set[str], packages: set[str]
) -> set[str]:
    """The packages' modules that ``node`` (in ``module``) imports: the most specific one each
    name reaches (``from pkg import name`` imports ``pkg.name`` when that is a module)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package holding ``module`` (itself if a package)
            parts = module.split(".") if module in packages else module.split(".")[:-1]
            package = parts[: len(parts) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
    targets: set[str] = set()
    for name in candidates:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def package_import_graph() -> dict[str, set[str]]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    known = {_module_name(path) for path in files}
    packages = {_module_name(path) for path in files if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for path in files:
        module = _module_name(path)
        imports = _runtime_imports(ast.parse(path.read_text(), str(path)))
        graph[module] = {
            target
            for node in imports
            for target in _imported_modules(node, module, known, packages)
            if target != module
        }
    return graph


def test_the_packages_import_graph_has_no_cycle() -> None:
    graph = package_import_graph()
    assert "clip_runtime.preprocessing" in graph["clip_runtime.engine"]  # edges are found
    assert "clip_runtime.settings" in graph["clip_runtime.preprocessing"]
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None
