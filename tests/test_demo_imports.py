"""The demo build's modules import downwards only: no cycles, and nothing imports the entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import sdlora

PACKAGE = Path(sdlora.__file__).parent
ENTRY_POINT = "sdlora.demo.build"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every sdlora module `path` imports anywhere in it (top level, in functions, under TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` as a list of modules, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if found := visit(target):
                return found
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if found := visit(node):
            return found
    return None


def test_nothing_in_the_package_imports_the_build_entry_point():
    graph = _graph()
    assert ENTRY_POINT in graph  # the walk found the module it guards
    assert [m for m, targets in graph.items() if ENTRY_POINT in targets] == []


def test_the_demo_modules_form_no_import_cycle():
    graph = _graph()
    demo = {
        m: {t for t in targets if t.startswith("sdlora.demo.")}
        for m, targets in graph.items()
        if m.startswith("sdlora.demo.")
    }
    assert len(demo) > 5 and any(demo.values())
    assert _cycle(demo) is None


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
