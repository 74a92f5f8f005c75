"""The package's import graph: no module imports another that imports it back (directly or through a
chain), and none reaches into another module's underscore-prefixed names. Read from the source (every
`import` and `from ... import`, function-level ones included), so nothing is imported here."""
from __future__ import annotations

import ast
from pathlib import Path
import sys
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "hgkernels"


def _modules() -> Dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Tuple[Set[str], List[str]]:
    """(the package modules `name` imports, the private names it takes from other package modules)."""
    tree = ast.parse(path.read_text())
    edges: Set[str] = set()
    private: List[str] = []
    aliases: Dict[str, str] = {}  # local name -> imported package module, for `alias._name` reads
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for item in node.names:
                if item.name in modules:
                    edges.add(item.name)
                    if item.asname:
                        aliases[item.asname] = item.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, path)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source not in modules:
                continue
            for item in node.names:
                submodule = f"{source}.{item.name}"
                if submodule in modules:  # `from . import x`: the module x, not a name of the package
                    edges.add(submodule)
                    aliases[item.asname or item.name] = submodule
                    continue
                edges.add(source)
                if item.name.startswith("_") and source != name:
                    private.append(f"{name} imports {source}.{item.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and f"{aliases[node.value.id]}.{node.attr}" not in modules):
            private.append(f"{name} reads {aliases[node.value.id]}.{node.attr}")
    edges.discard(name)
    return edges, private


def _graph():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        graph[name], taken = _imports(name, path, modules)
        private.extend(taken)
    return graph, private


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through each strongly connected component that has one (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            visit(v)
    return found


def test_the_graph_is_read():
    graph, _ = _graph()
    assert "hgkernels.backends.base" in graph["hgkernels.backends.torch_backend"]
    assert "hgkernels.losses" in graph["hgkernels.backends.torch_backend"]


def test_no_import_cycles():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_no_module_takes_another_modules_private_names():
    _, private = _graph()
    assert private == []


def test_each_options_table_states_its_functions_signature():
    import inspect

    from hgkernels.penalties.registry import PENALTIES
    for entry in PENALTIES.values():
        keywords = {name: p.default for name, p in inspect.signature(entry.function).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert list(entry.options.items()) == list(keywords.items()), entry.function.__name__
        assert set(entry.choices) <= set(entry.options), entry.function.__name__


def test_every_plan_follows_the_plan_contract():
    import hgkernels
    from hgkernels.penalties.base import Plan

    plans = [obj for module in list(sys.modules.values()) if getattr(module, "__name__", "").startswith("hgkernels")
             for name, obj in vars(module).items()
             if isinstance(obj, type) and name.endswith("Plan") and obj.__module__ == module.__name__
             and obj.__module__ != Plan.__module__ and not name.startswith("_")]  # bases: not plans themselves
    assert hgkernels.__name__ and len(plans) >= 7
    assert [p.__name__ for p in plans if not issubclass(p, Plan)] == []
    concrete = [p for p in plans if not any(q is not p and issubclass(q, p) for q in plans)]  # not a shared base
    for plan in concrete:  # the contract's three methods, each written by the plan or a base it names
        assert all(getattr(plan, m) is not getattr(Plan, m) for m in ("forward", "backward", "feature_form")), plan
