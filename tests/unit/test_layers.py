"""The packages' layering, read from the source: every import (lazy ones inside functions too) between
modules of the project, with no import loop and no arrow from a lower layer to a higher one.

Layers, bottom up: the client (`minigpt5_client`, no torch) and the load tests; `minigpt5` (model,
serving, launcher, CLI); the benches (`minigpt5_bench`), which measure the others and are imported
by none of them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "minigpt5_client": ROOT / "client" / "minigpt5_client",
    "minigpt5": ROOT / "minigpt5",
    "minigpt5_bench": ROOT / "bench" / "minigpt5_bench",
    "loadtest": ROOT / "loadtest",
}
# What each package may import from the others (itself always).
ALLOWED = {
    "minigpt5_client": set(),
    "loadtest": {"minigpt5_client"},
    "minigpt5": {"minigpt5_client"},
    "minigpt5_bench": {"minigpt5", "minigpt5_client"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names]  # a module, or a name in `base`
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_is_read():
    graph = _graph()
    assert "minigpt5.serving.triton_io" in graph["minigpt5.serving.minigpt5_model"]
    assert "minigpt5.launcher.local" in graph["minigpt5_bench.reliability.command"]  # a relative import
    assert "minigpt5_client.contract" in graph["minigpt5.request"]


def test_no_package_imports_a_higher_layer():
    wrong = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if (top := target.split(".")[0]) != name.split(".")[0] and top not in ALLOWED[name.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_import_loops():
    """Tarjan's strongly connected components: a component of more than one module is a loop."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not loops, loops
