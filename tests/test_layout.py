"""Product code never imports the tests or the test support package; the packages' imports form
no cycle; importing a module of the service does no I/O (only the wiring modules do)."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
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


def package_modules(*packages: str) -> dict[str, Path]:
    """Every module of ``packages`` by its dotted name, in path order."""
    files = [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]
    return {_module_name(path): path for path in files}


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
    modules = package_modules(*PACKAGES)
    known = set(modules)
    packages = {module for module, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
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


# The modules that build the services from the settings and the model store (BentoML wants each
# service created at module level): importing any other module reads neither.
WIRING_MODULES = {"clip_service.evaluator", "clip_service.scorer"}
# What reads the settings or the model store.
SETTINGS_OR_STORE = {
    "get_settings",
    "ClipSettings",
    "add_store_references",
    "stored_folders",
    "model_folders",
}


def import_time_calls(tree: ast.Module) -> set[str]:
    """The names of the functions a module calls when it is imported: at module level, in class
    bodies, decorators and default values; not inside function bodies."""
    called: set[str] = set()
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            pending += [*node.decorator_list, *node.args.defaults]
            pending += [default for default in node.args.kw_defaults if default is not None]
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
            called.add(node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
        pending.extend(ast.iter_child_nodes(node))
    return called


def test_only_the_wiring_modules_read_settings_or_the_store_at_import() -> None:
    """Static, so it sees the modules that load torch too (too slow to import in a test)."""
    offenders = {}
    for module, path in package_modules("clip_runtime", "clip_service").items():
        calls = import_time_calls(ast.parse(path.read_text(), str(path)))
        if module not in WIRING_MODULES and calls & SETTINGS_OR_STORE:
            offenders[module] = sorted(calls & SETTINGS_OR_STORE)
    assert offenders == {}


def test_the_import_time_check_sees_the_wiring_read_the_settings_and_the_store() -> None:
    tree = ast.parse((ROOT / "clip_service" / "evaluator.py").read_text())
    assert import_time_calls(tree) >= {"get_settings", "add_store_references"}
    assert "get_settings" not in import_time_calls(ast.parse("def f():\n    get_settings()\n"))


# Imports every module named on the command line, then the model worker's wiring, which must fail
# on the environment's invalid setting: proof that the environment was invalid all along.
IMPORT_EVERY_MODULE = """
import importlib, sys
from pydantic import ValidationError
for name in sys.argv[1:]:
    importlib.import_module(name)
try:
    importlib.import_module("clip_service.scorer")
except ValidationError as error:
    print("wiring refused:", error.errors()[0]["loc"])
"""


def test_importing_the_service_modules_reads_no_settings_and_no_model_store(
    tmp_path: Path,
) -> None:
    """Every module of clip_service but the wiring modules (and so every module of clip_runtime
    that they import) imports with a setting that cannot be parsed and a served model missing
    from an empty store: nothing read the settings or the store at import."""
    modules = [module for module in package_modules("clip_service") if module not in WIRING_MODULES]
    assert "clip_service.front_end" in modules and "clip_service.model_worker" in modules
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BENTOML_HOME": str(tmp_path),  # an empty model store
        "CLIP_MODELS": "ViT-B-32",
        "CLIP_MAX_BATCH_SIZE": "not-a-number",
    }
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE, *modules],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "wiring refused: ('max_batch_size',)"
