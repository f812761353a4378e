"""The package's modules import each other without a circle, lazy (in-function) imports included: a circle
means one of them cannot be understood, or imported, without the other."""

from __future__ import annotations

import ast
from pathlib import Path

import vlsi

PACKAGE = Path(vlsi.__file__).parent


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The vlsi modules a module imports anywhere in its body, except under ``if TYPE_CHECKING:`` (never run)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "vlsi":
                # `from vlsi import x` imports module x when x is one.
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names} & modules
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vlsi.")}
        stack.extend(ast.iter_child_nodes(node))
    return found & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {p.stem: p for p in package.glob("*.py")}
    modules = set(files)
    return {m: _imported_modules(ast.parse(p.read_text()), modules) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_one():
    # The check below can only pass vacuously if the finder is blind; it is not.
    assert find_cycle({"cli": {"plan"}, "plan": {"memory", "cli"}, "memory": set()}) == ["cli", "plan", "cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "distill" in graph["cli"]  # imported inside _commands() only
    assert "plan" not in graph["memory"]  # only under TYPE_CHECKING


def test_no_import_cycles_in_the_package():
    assert find_cycle(import_graph()) is None
