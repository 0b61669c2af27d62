"""The house's shape (STYLE.md), checked on the source: the layout by stage, no import cycle, and the size limits
of modules, functions and signatures. A change that breaks one of them fails here, naming the place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ink_infer"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8
MAX_TOP_MODULES = 8
MIN_SUBPACKAGES = 4


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``ink_infer.run.plan``); a package's ``__init__`` as the
    package's name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (at the top or inside a function): a
    lazy import still ties the two modules together."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    return found


def test_the_layout_is_by_stage() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert len(subpackages) >= MIN_SUBPACKAGES, subpackages
    for stage in ("volumes", "engine", "models", "run", "outputs"):
        assert stage in subpackages


def test_no_import_cycle() -> None:
    """Between modules (packages' ``__init__`` left out: Python imports a package before any of its modules, so
    an edge to one says nothing of the order, and the top package's lazy API is meant to sit above everything)."""
    found = modules()
    nodes = {n: p for n, p in found.items() if p.name != "__init__.py"}
    graph = {n: imports_of(n, p, set(nodes)) - {n} for n, p in nodes.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m) :] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_geometry_leaf_imports_nothing_of_ours() -> None:
    assert imports_of("ink_infer.geometry", PACKAGE / "geometry.py", set(modules())) == set()


def sizes(package: Path = PACKAGE) -> list[str]:
    """Every breach of the size limits, as ``path:line name: what``."""
    breaches = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(package.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            breaches.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                breaches.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [x for x in (a.vararg, a.kwarg) if x]
            params = [p for p in params if p.arg not in ("self", "cls")]
            if len(params) > MAX_PARAMETERS:
                breaches.append(f"{rel}:{node.lineno} {node.name}: {len(params)} parameters")
    return breaches


def test_modules_functions_and_signatures_stay_small() -> None:
    assert sizes() == []


def test_the_size_check_can_fail(tmp_path: Path) -> None:
    """The checks above read what they claim to read: a long function with many parameters is caught."""
    pkg = tmp_path / "ink_infer"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    params = ", ".join(f"p{i}" for i in range(MAX_PARAMETERS + 1))
    (pkg / "big.py").write_text(f"def f({params}):\n{body}\n")
    assert sizes(pkg) == [
        f"ink_infer/big.py:1 f: {MAX_FUNCTION_LINES + 1} lines",
        f"ink_infer/big.py:1 f: {MAX_PARAMETERS + 1} parameters",
    ]
