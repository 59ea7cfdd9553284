"""The layout DESIGN.md fixes, checked on the source: dependency direction, no import cycles.

`services -> common -> kernels`; services never import each other, except the worker and its two
role packages (`services.worker` <-> `services.prefill` / `services.decode`); nothing in the
product imports the benchmarks or the application entry (`xllm`). Imports inside functions count
too: a lazy import is still a dependency, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("common", "kernels", "services", "bench", "xllm")
WORKER_FAMILY = {"worker", "prefill", "decode"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in TOP_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or None for third-party."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    resolved = {_resolve(name) for name in names}
    # A submodule importing its own parent package is how Python loads it anyway: not an edge.
    return {dep for dep in resolved if dep and dep != module and not module.startswith(dep + ".")}


GRAPH = {module: _imports(module) for module in MODULES}


def _top(module: str) -> str:
    return module.split(".")[0]


def _service(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def test_the_scan_sees_the_project():
    assert {"common.engine.engine", "services.worker.worker", "kernels.attention", "xllm.cli"} <= MODULES.keys()
    assert "common.engine.engine" in GRAPH["services.worker.main"] or any(
        dep.startswith("common.engine") for dep in GRAPH["services.worker.main"]
    )


@pytest.mark.parametrize("lower, forbidden", [
    ("kernels", {"common", "services", "bench", "xllm"}),
    ("common", {"services", "bench", "xllm"}),
    ("services", {"bench", "xllm"}),
])
def test_dependencies_point_down(lower, forbidden):
    wrong = sorted(
        f"{module} -> {dep}"
        for module, deps in GRAPH.items() if _top(module) == lower
        for dep in deps if _top(dep) in forbidden
    )
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_services_do_not_import_each_other():
    wrong = []
    for module, deps in GRAPH.items():
        own = _service(module)
        if own is None:
            continue
        for dep in deps:
            other = _service(dep)
            if other is None or other == own:
                continue
            if own in WORKER_FAMILY and other in WORKER_FAMILY:
                continue  # the worker is one program with roles (DESIGN.md §1)
            wrong.append(f"{module} -> {dep}")
    assert not wrong, "services must talk over the bus, not import each other:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
