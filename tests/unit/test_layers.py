"""The package's import graph: no module imports a layer above its own, and no import cycles.

The layer contract itself is import-linter's (pyproject.toml, run by `make lint`); this test adds
what a layer contract cannot see: cycles between modules of the same package.
"""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("orchard", cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every import cycle between modules (each as the list of its modules), found by depth-first search."""
    found, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                found.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")
    assert cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]


def test_executors_need_only_core_and_the_spark_app(graph: grimp.ImportGraph) -> None:
    """What spark_app imports (the packages shipped to executors) stays inside core + spark_app."""
    reached = graph.find_upstream_modules("orchard.spark_app", as_package=True)
    assert {m for m in reached if not m.startswith(("orchard.core", "orchard.spark_app"))} <= {"orchard"}
