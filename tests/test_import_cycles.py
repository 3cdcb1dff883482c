"""No import cycles inside either package: every module stands above everything it imports.

The import graph is read statically from every ``import`` statement of every module of
``runtime`` and ``recipe_compiler`` (function-level imports included, so a cycle cannot hide in a
lazy import), resolved to modules of the same package. An edge into a package means its
``__init__``; importing a submodule does not count as importing its parent package (Python runs
the parent's ``__init__`` first, which is how a registry package imports its members). Registries
are filled by the members importing a low module, never by a bottom-of-file import back up.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "recipe_compiler")


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()

    def add(target: str) -> None:
        while target and target not in known:  # ``from pkg.mod import name``: name is not a module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # ``from . import member`` imports the submodule itself
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_the_package(package):
    known = _modules(package)
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert sum(map(len, graph.values())) > len(graph) // 2, "the import graph was not read"  # the check has teeth
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle_when_there_is_one(tmp_path):
    for name, text in {"a.py": "from . import b\n", "b.py": "def f():\n    from .a import g\n", "__init__.py": ""}.items():
        (tmp_path / name).write_text(text)
    known = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert _cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_a_registry_package_importing_its_members_is_not_a_cycle():
    known = _modules("runtime")
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert "runtime.families.llava" in graph["runtime.families"]  # the package imports its members…
    assert "runtime.families.base" in graph["runtime.families.llava"]  # …which register into the low module
    assert "runtime.families" not in graph["runtime.families.base"]
