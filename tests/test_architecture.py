"""Import guards: dependencies point one way and there are no circles (docs/architecture.md).

Imports are read from the source (module level and inside functions alike), so an import
hidden in a function to dodge a circle is still seen.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DAGSTER_CODE = {"assets", "ops", "resources", "sensors", "schedules", "jobs", "definitions"}
FIRST_PARTY = DAGSTER_CODE | {"roadloop", "fleet", "edge_agent", "federated", "launch"}

# What each layer may import of the first-party packages (its own package included).
ALLOWED: dict[str, set[str]] = {
    "edge_agent": {"edge_agent"},
    "roadloop": {"roadloop", "edge_agent"},
    "fleet": {"fleet", "roadloop"},
    "federated": {"federated", "roadloop", "edge_agent"},
    **{pkg: DAGSTER_CODE | {"roadloop", "edge_agent", "federated"} for pkg in DAGSTER_CODE},
    "launch": FIRST_PARTY,
}
# Single modules of another layer a layer may import besides ALLOWED (prefix match).
# fleet -> edge_agent.traffic: the gateway and the agent must agree on what a valid camera
# geometry is, so the gateway validates the config's traffic section with the agent's parser.
ALLOWED_MODULES: dict[str, set[str]] = {"fleet": {"edge_agent.traffic"}}
# Third-party frameworks a layer must never import.
FORBIDDEN_FRAMEWORKS: dict[str, set[str]] = {
    "roadloop": {"dagster", "dagster_mlflow", "dagster_k8s", "fastapi", "uvicorn", "sqlalchemy"},
    "fleet": {"dagster", "torch", "ultralytics", "fiftyone", "mlflow"},
    "edge_agent": {"dagster", "torch", "ultralytics", "pydantic", "fastapi", "mlflow"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _source_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for pkg in sorted(FIRST_PARTY):
        single = REPO / f"{pkg}.py"
        if single.is_file():
            modules[pkg] = single
        folder = REPO / pkg
        if folder.is_dir():
            for path in sorted(folder.rglob("*.py")):
                modules[_module_name(path)] = path
    return modules


MODULES = _source_modules()


def _imports(path: Path, module: str) -> set[str]:
    """Every module name an import statement in ``path`` refers to (absolute names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}"
                found.add(candidate if candidate in MODULES else prefix)
    return found


GRAPH = {m: {i for i in _imports(p, m) if i.split(".")[0] in FIRST_PARTY} for m, p in MODULES.items()}
THIRD_PARTY = {m: {i.split(".")[0] for i in _imports(p, m)} for m, p in MODULES.items()}


def test_sources_were_found() -> None:
    for must in ("roadloop.settings", "roadloop.data.frames", "fleet.app", "edge_agent.agent",
                 "launch.cli", "definitions"):
        assert must in MODULES


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    bad = {
        f"{m} imports {i}"
        for m, imports in GRAPH.items()
        if m.split(".")[0] == layer
        for i in imports
        if i.split(".")[0] not in ALLOWED[layer]
        and not any(i == p or i.startswith(p + ".") for p in ALLOWED_MODULES.get(layer, ()))
    }
    assert not bad, sorted(bad)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_FRAMEWORKS))
def test_layer_never_imports_forbidden_frameworks(layer: str) -> None:
    bad = {
        f"{m} imports {lib}"
        for m, libs in THIRD_PARTY.items()
        if m.split(".")[0] == layer
        for lib in libs & FORBIDDEN_FRAMEWORKS[layer]
    }
    assert not bad, sorted(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_package_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the edges a package's ``__init__`` has to its own submodules: re-exporting public
    names is not a dependency of the package's code on itself."""
    pruned = {}
    for m, imports in graph.items():
        is_pkg = MODULES[m].name == "__init__.py"
        pruned[m] = {i for i in imports if not (is_pkg and i.startswith(m + "."))}
    return pruned


def test_no_import_cycles() -> None:
    assert _cycles(_without_package_reexports(GRAPH)) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_cli_settings_loads_no_service_frameworks() -> None:
    """``roadloop settings`` must not pay for Dagster, the gateway or FiftyOne."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from launch.cli import app\n"
        "r = CliRunner().invoke(app, ['settings'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'dagster', 'fastapi', 'sqlalchemy', 'fiftyone', 'fleet', 'torch', 'ultralytics'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_cli_lists_and_runs_lazy_commands() -> None:
    from typer.testing import CliRunner

    from launch.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("gateway", "fleet", "annotate", "demo", "settings", "dataset"):
        assert name in result.output
    result = CliRunner().invoke(app, ["fleet", "token", "--help"])
    assert result.exit_code == 0 and "create" in result.output
