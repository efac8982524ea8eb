"""fleet/ has no import cycles — counting every import, wherever it is written.

The graph is read from the source (AST), not from ``sys.modules``: an import inside a
function, or under ``if TYPE_CHECKING:``, is an edge like any other, so a cycle cannot be
hidden by moving one of its imports into a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """``module -> modules of the same package it imports`` for every ``.py`` under
    ``package_dir`` (the package is named after the folder)."""
    root = package_dir.parent
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def known(name: str) -> str | None:
        """The module ``name`` lands in: itself, else its nearest package-level parent."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                hit = known(target)
                if hit is not None and hit != mod:
                    graph[mod].add(hit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_fleet_import_graph_is_acyclic() -> None:
    graph = import_graph(REPO / "fleet")
    # The graph is really read: the routes sit above the policy, the caches and the runtime.
    assert {"fleet.auth", "fleet.rollout_policy", "fleet.runtime"} <= graph["fleet.rollouts"]
    assert "fleet.reconcile" in graph["fleet.runtime"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in fleet/: " + " -> ".join(cycle or [])


def test_fleet_layers() -> None:
    """The edges that made the old circle stay gone: auth and the runtime state never import
    the routes, and nothing imports intake (the frame-upload route) but the app."""
    graph = import_graph(REPO / "fleet")
    routes = {"fleet.intake", "fleet.intake_batch", "fleet.rollouts", "fleet.heartbeats", "fleet.admin",
              "fleet.camera_config"}
    for low in ("fleet.auth", "fleet.runtime", "fleet.caches", "fleet.ratelimit",
                "fleet.reconcile", "fleet.rollout_policy", "fleet.rollout_db"):
        assert not graph[low] & routes, f"{low} imports {sorted(graph[low] & routes)}"
    importers = {m for m, deps in graph.items() if "fleet.intake" in deps}
    assert importers == {"fleet.app", "fleet.intake_batch"}, importers  # the batch route
    assert {m for m, deps in graph.items() if "fleet.intake_batch" in deps} == {"fleet.app"}


def test_cycle_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a  # dodges the cycle\n    return a\n")
    (pkg / "c.py").write_text("from . import b\nfrom .a import f\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"},
                     "pkg.c": {"pkg.a", "pkg.b"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None
