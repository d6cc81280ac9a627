"""No import cycle inside `src/gptforge`: the dependencies between its modules run one way; and reading saved
weights (weights, hf, checkpoint reading, the model) sits below training and fine-tuning.

Every import counts, also those inside functions (a lazy import hides a cycle from Python, not from a
reader); only `if TYPE_CHECKING:` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gptforge

ROOT = Path(gptforge.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The gptforge modules `module` imports (`from pkg import sub` names the submodule when it is one)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != module}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return {
        name: _imported(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One concrete loop through a component, for the failure message: a -> b -> ... -> a."""
    members, start = set(component), component[0]
    seen, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return " -> ".join([*seen[v], start])
                if w not in seen:
                    seen[w] = [*seen[v], w]
                    nxt.append(w)
        frontier = nxt
    return " <-> ".join(component)


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert _path(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_from_imports_resolve_to_modules():
    modules = {"gptforge.x", "gptforge.x.y", "gptforge.z"}
    tree = ast.parse(
        "from . import y\nfrom gptforge import z\nimport typing\n"
        "if TYPE_CHECKING:\n    from gptforge.x import nothing\n"
        "def f():\n    from gptforge.z import thing\n"
    )
    assert _imported(tree, "gptforge.x", True, modules) == {"gptforge.x.y", "gptforge.z"}


def test_no_import_cycle_in_gptforge():
    graph = import_graph()
    assert len(graph) > 30 and "gptforge.train.loop" in graph
    found = [f"{_path(graph, c)} (the loop's modules: {', '.join(c)})" for c in cycles(graph)]
    assert not found, "import cycles in src/gptforge:\n" + "\n".join(found)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


@pytest.mark.parametrize(
    "reader", ["gptforge.weights", "gptforge.hf", "gptforge.checkpoint_format", "gptforge.model"]
)
def test_reading_saved_weights_sits_below_training_and_fine_tuning(reader):
    graph = import_graph()
    above = sorted(
        m for m in _reachable(graph, reader) if m.startswith(("gptforge.train", "gptforge.finetune"))
    )
    assert not above, f"{reader} imports {', '.join(above)}"
