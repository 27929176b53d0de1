"""The import graph of distill/, kernels/ and eval/ points one way: from the entry points down to the leaves.

Read from the source with `ast` (every import, at the top of a module or inside a function), so it holds for
the imports a run takes lazily too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"distill": ROOT / "distill", "distill.kernels": ROOT / "kernels", "distill.eval": ROOT / "eval"}
ENTRY_POINTS = {"distill.run", "distill.cli", "distill.__main__"}
STAGE_RUNNER = "distill.stages"


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if path.parent.name in ("kernels", "eval") and path.parent.parent == ROOT / "distill":
                continue  # the symlinks: read through their own folders
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            files[name] = path
    return files


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `name` imports (`from a import b` counts as a.b when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def test_the_graph_is_read(graph):
    # a parser that found nothing would pass every check below
    assert "distill.data" in graph["distill.trainer"]
    assert "distill.kernels.dispatch" in graph["distill.modeling_hybrid"]


def test_no_circles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_only_the_runner_imports_a_stage(graph):
    stages = {name for name in graph if name.startswith(f"{STAGE_RUNNER}.")}
    assert stages, "no stage modules found"
    offenders = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets & stages
                       if name != STAGE_RUNNER)
    assert not offenders, offenders


def test_nothing_imports_an_entry_point(graph):
    offenders = sorted(f"{name} -> {target}" for name, targets in graph.items()
                       for target in targets & ENTRY_POINTS if name != "distill.__main__")
    assert not offenders, offenders


def test_no_fast_kernel_imports_a_reference_kernel(graph):
    """`*_naive.py` are the readable references; fast paths share helpers through a module of their own. Only
    the dispatcher (which offers the references as a backend) and other references may import them."""
    naive = {name for name in graph if name.startswith("distill.kernels.") and name.endswith("_naive")}
    offenders = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets & naive
                       if name not in naive and name != "distill.kernels.dispatch")
    assert not offenders, offenders
