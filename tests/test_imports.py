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


def _imported_modules(tree: ast.AST, modules: set[str], package: str) -> set[str]:
    """The vlsi modules (dotted, below ``vlsi``: ``data.records``) a module imports anywhere in its body, except
    under ``if TYPE_CHECKING:`` (never run). ``package`` is the importing module's own package, for relative
    imports."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").split(".")[0] == "vlsi"
        ):
            if node.level > 0:
                base = ["vlsi", *package.split(".")] if package else ["vlsi"]
                base = base[: len(base) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = node.module.split(".")
            name = ".".join(parts[1:])
            # `from vlsi.data import records` imports module data.records when that is one.
            found |= {name} | {f"{name}.{a.name}".lstrip(".") for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("vlsi.")}
        stack.extend(ast.iter_child_nodes(node))
    return found & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package and its subpackages (``__init__`` files as their package), by dotted name
    below ``vlsi``."""
    files = {}
    for p in package.rglob("*.py"):
        parts = p.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            files[".".join(parts)] = p
    modules = set(files)
    graph = {}
    for m, p in files.items():
        own_package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        graph[m] = _imported_modules(ast.parse(p.read_text()), modules, own_package) - {m}
    return graph


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
    assert "run.distill" in graph["run.cli"]  # imported inside _commands() only
    assert "run.plan" not in graph["run.memory"]  # only under TYPE_CHECKING
    assert "losses.tokens" in graph["data.records"]  # a module in another subpackage


def test_the_graph_holds_every_module_of_every_subpackage():
    graph = import_graph()
    assert {"data.records", "model.backbone", "losses.chunked", "train.training", "run.cli"} <= set(graph)


def test_no_import_cycles_in_the_package():
    assert find_cycle(import_graph()) is None


def _subpackage(module: str) -> str:
    return module.split(".")[0]


def test_the_data_model_and_losses_layers_do_not_import_each_other_in_a_circle():
    """Collapsed to subpackages, ``data``, ``model`` and ``losses`` form no circle: the data layer does not call
    into the model layer, and neither reaches back into data for a constant. Type-only imports count too."""
    graph = {}
    for m, deps in import_graph().items():
        graph.setdefault(_subpackage(m), set()).update(
            _subpackage(d) for d in deps if _subpackage(d) != _subpackage(m)
        )
    lower = {
        k: v & {"data", "model", "losses", "hub"}
        for k, v in graph.items()
        if k in ("data", "model", "losses")
    }
    assert find_cycle(lower) is None, lower
    assert "model" not in graph["data"] and "data" not in graph["model"] and "data" not in graph["losses"]
    # run.memory's formulas read ModelSummary from their own module, not from the plan that builds it.
    memory = (PACKAGE / "run" / "memory.py").read_text()
    assert "from vlsi.run.plan import" not in memory
