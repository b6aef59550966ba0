"""The import rule, read from the source with `ast`: run never imports compile or models (a deployed
module needs neither), models never import TVM or the build YAML's config (config reads the model
registry), io imports none of the packages above it, the library never imports the CLI. Imports inside
functions count too (a lazy import is still an arrow; `if TYPE_CHECKING:` imports do not), and so
do imports reached through other tvmzoo modules: run may not reach compile by way of a third package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tvmzoo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST, type_only_too: bool = False):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if not type_only_too and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, type_only_too: bool = False) -> set[str]:
    """Absolute names of every module `path` imports (`from a import b` counts as a and a.b)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path)), type_only_too):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _reached(start: str) -> dict[str, str]:
    """Every module reachable from `start` through tvmzoo imports -> the tvmzoo module importing it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        current = todo.pop()
        for imported in GRAPH.get(current, ()):
            if imported in seen:
                continue
            seen[imported] = current
            if imported in GRAPH:
                todo.append(imported)
    return seen


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(sources: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module in sorted(m for m in GRAPH if _in(m, sources)):
        for imported, by in _reached(module).items():
            if any(_in(imported, f) for f in forbidden):
                bad.append(f"{module} reaches {imported} (imported by {by})")
    return bad


def test_the_graph_is_read():
    assert "tvmzoo.run.runtime" in GRAPH and "tvmzoo.compile.compiler" in GRAPH
    assert "tvmzoo.run.runtime" in _reached("tvmzoo.compile.compiler")   # relative imports resolved
    assert "tvm" in _reached("tvmzoo.run.runtime")                       # lazy imports counted


@pytest.mark.parametrize("sources, forbidden", [
    ("tvmzoo.run", ("tvmzoo.compile", "tvmzoo.models")),
    ("tvmzoo.models", ("tvm", "tvm_ffi", "tvmzoo.config")),
    ("tvmzoo.io", ("tvmzoo.config", "tvmzoo.models", "tvmzoo.compile", "tvmzoo.run")),
])
def test_import_rule(sources, forbidden):
    assert _violations(sources, forbidden) == []


def test_the_library_never_imports_the_cli():
    library = [m for m in GRAPH if not _in(m, "tvmzoo.cli")]
    assert [f"{m} imports the CLI" for m in library if any(_in(i, "tvmzoo.cli") for i in GRAPH[m])] == []


def test_the_checker_sees_a_violation():
    assert _violations("tvmzoo.compile", ("tvmzoo.run",))   # compile uses run's module format: an arrow exists


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among modules (package __init__s aside: a package imports its own modules)."""
    packages = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").is_file()}
    edges = {m: sorted(i for i in imports if i in graph and i not in packages and i != m)
             for m, imports in graph.items() if m not in packages}
    found, done = [], set()

    def walk(path: list[str]) -> None:
        for nxt in edges.get(path[-1], ()):
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt not in path and nxt not in done:
                walk([*path, nxt])

    for start in sorted(edges):
        walk([start])
        done.add(start)
    return found


def test_no_module_imports_one_that_imports_it_back():
    """Two modules that import each other (lazily, or only for type hints) are one module split in two:
    the shared piece belongs in one of them, or in a third both import."""
    every_import = {_module_name(p): _imports(p, type_only_too=True) for p in PACKAGE.rglob("*.py")}
    assert _cycles(every_import) == []


SCRIPTS = [p for folder in ("benchmarks", "common", "scripts") for p in sorted((PACKAGE.parent / folder).rglob("*.py"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_scripts_import_names_the_library_has(script: Path):
    """Benchmarks and the vendor scripts are not run by the suite: a name moved in the library must not leave
    them importing something that is gone (vs_peers.py still imported calibration_batches from io.images)."""
    import importlib

    missing = []
    for node in ast.walk(ast.parse(script.read_text(), str(script))):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tvmzoo")):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                missing.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    assert not missing, missing
