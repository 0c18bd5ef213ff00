"""The package's import structure: no cycles, nothing below the pipeline imports it, and no
test or benchmark reaches for another module's private names (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tsquant"
ABOVE_THE_PIPELINE = {"tsquant.cli", "tsquant.__main__", "tsquant.pipeline"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every tsquant module ``path`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tsquant")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("tsquant"):  # `from . import x`: x may be a submodule
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(
                        sub
                        if (PACKAGE.parent / f"{sub.replace('.', '/')}.py").is_file()
                        else target
                    )
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the tsquant modules importing it runs: what it names and their parent
    packages (importing tsquant.export.graph runs tsquant/export/__init__.py first), but for
    the module's own parents, which are being imported already."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in paths.items():
        named = imports_of(path, name)
        parents = {m.rsplit(".", k)[0] for m in named for k in range(1, m.count(".") + 1)}
        parents = {p for p in parents if not name.startswith(p + ".")}  # already running
        edges[name] = {m for m in named | parents if m in paths and m != name}
    return edges


def package_of(module: str) -> str:
    return module if module.count(".") < 2 else module.rsplit(".", module.count(".") - 1)[0]


def test_nothing_below_the_pipeline_imports_it():
    offenders = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if b.startswith("tsquant.pipeline") and package_of(a) not in ABOVE_THE_PIPELINE
    ]
    assert offenders == []


def test_no_import_cycles_between_modules():
    """Importing a package runs its __init__, so a package is a node whose edges are its
    __init__'s imports."""
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_tests_and_benchmarks_use_public_names_only():
    offenders = []
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tsquant"):
                offenders += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert offenders == []
