"""The shape of the house: the core stays within its line budget (docs/design.md says why this number), no
module grows past 500 lines, and the package's imports run one way (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO, core_files

CORE_BUDGET = 2400  # lines of src/nnlab/*.py; see docs/design.md, "Core budget"
PACKAGE = REPO / "src" / "nnlab"


def test_core_within_budget() -> None:
    sizes = {f.name: len(f.read_text().splitlines()) for f in core_files()}
    total = sum(sizes.values())
    assert total <= CORE_BUDGET, f"core is {total} lines, over its budget of {CORE_BUDGET}: {sizes}"


def test_no_module_over_500_lines() -> None:
    sizes = {str(f.relative_to(PACKAGE)): len(f.read_text().splitlines()) for f in PACKAGE.rglob("*.py")}
    big = {f: n for f, n in sizes.items() if n > 500}
    assert not big, f"split these into siblings: {big}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """nnlab modules a module imports, at its top or lazily inside a function (both are dependencies)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # `from . import models`: the submodule if there is one
                sub = f"{target}.{alias.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnlab"):
            out.add(node.module)
    return out - {name}


def test_imports_run_one_way() -> None:
    """No cycles, except a package importing its own family files at its end to register them (models/, tasks/,
    data/): those files import the package's registry, the package imports them; nothing else loops."""
    graph = {module_name(f): imports(f) for f in PACKAGE.rglob("*.py")}
    for mod, deps in graph.items():  # drop the registration edges package -> its own submodule
        graph[mod] = {d for d in deps if not d.startswith(mod + ".")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
