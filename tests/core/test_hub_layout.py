"""The hub's structure, checked: routers import no other router, the rooms import only downwards
(infra <- domain <- channels <- root <- deps <- routers <- app), and no import circles inside xiaozhi/hub
(lazy imports inside functions count; imports only for type checking do not).

The schema's migrations sit at the root beside the composition root: they gather every room's tables
(the store's, the domain's accounts and surveys), and the root runs them at start (``migrations.prepare``);
the store below knows nothing of them."""

from __future__ import annotations

import ast
from pathlib import Path

import xiaozhi.hub

HUB = Path(xiaozhi.hub.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(HUB.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module this one imports at run time (type-checking blocks skipped)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)  # `from pkg import module`
            visit(child)

    visit(tree)
    return found


def hub_import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in HUB.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py")
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
            strongconnect(v)
    return found


def test_the_cycle_finder_finds_a_circle_and_the_import_reader_reads_lazy_and_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n    import only.for_types\n"
        "def f():\n    from pkg.lazy import thing\n"
    )
    found = _imports(tree, "pkg.mod", False)
    assert {"pkg.sibling", "pkg.lazy", "pkg.lazy.thing"} <= found and "only.for_types" not in found


def test_no_import_circles_in_the_hub():
    assert cycles(hub_import_graph()) == []


# Rooms from the bottom up; a module may import its own room and the ones below.
RANKS = {"infra": 0, "domain": 1, "channels": 2, "metrics": 3, "widget": 3, "migrations": 3, "services": 3, "deps": 4,
         "routers": 5, "app": 6}


def _rank(module: str) -> int:
    return RANKS[module.split(".")[2]]


def test_the_hub_rooms_import_only_downwards():
    graph = hub_import_graph()
    modules = [m for m in graph if m != "xiaozhi.hub"]
    unplaced = [m for m in modules if m.split(".")[2] not in RANKS]
    assert unplaced == [], "a module outside the hub's rooms"
    upwards = sorted(f"{m} -> {d}" for m in modules for d in graph[m] if d != "xiaozhi.hub" and _rank(d) > _rank(m))
    assert upwards == []


def test_routers_import_no_other_router_and_nothing_imports_a_router_but_the_app():
    graph = hub_import_graph()
    routers = {m for m in graph if m.startswith("xiaozhi.hub.routers.") and not m.endswith("__init__")}
    assert routers, "the routers were not found"
    offenders = {
        module: sorted(graph[module] & routers)
        for module in graph
        if module != "xiaozhi.hub.app" and graph[module] & routers
    }
    assert offenders == {}
