"""The package's import graph: no module imports, directly or through others, a module that imports it.

Every import counts (at the top, inside a function, under ``TYPE_CHECKING``): a circle anywhere means
some module cannot be read without one above it. Layers fall out of an acyclic graph: a module stands
above everything it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastmt"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name and t != "fastmt")
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circles():
    circle = _circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_settings_and_the_loop_import_no_task():
    graph = import_graph()

    def reach(m: str) -> set[str]:
        seen, todo = set(), [m]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        return seen

    tasks = {m for m in graph if m.startswith("fastmt.tasks")} | {"fastmt.cli"}
    assert not reach("fastmt.config.settings") & (tasks | {"fastmt.engine.loop", "fastmt.engine.optim"})
    assert not reach("fastmt.engine.loop") & tasks
    assert "fastmt.errors" not in graph or not graph["fastmt.errors"]  # the ground floor
