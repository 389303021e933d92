"""The code's shape: no import cycle among first-party modules (imports inside functions included), and no source
file over 450 lines (gradmap/, methods/, experiments/, run.py); no framework module imports a method."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gradmap", "methods", "experiments")
MAX_LINES = 450


def source_files() -> dict[str, Path]:
    """Module name -> file, for every first-party source file."""
    files = {"run": ROOT / "run.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """First-party modules a file imports anywhere in it (module level, functions, `if TYPE_CHECKING`)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "gradmap.runner" in graph["gradmap.jobs"]  # imported inside run_job, after validation
    assert "gradmap.checkpoint" in graph["gradmap.assets.gguf"]  # imported inside convert_gguf
    assert "gradmap.assets.cli" in graph["gradmap.assets"]


def test_no_import_cycle_among_first_party_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_source_file_over_450_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in source_files().items()}
    assert len(sizes) > 40
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, too_long


def test_no_framework_module_imports_a_method():
    """gradmap/ is the framework, methods/ the algorithms built on it (the Hydra groups name them): a framework
    module that imported a method would make the framework depend on one algorithm."""
    graph = import_graph()
    leaks = {name: sorted(d for d in deps if d.startswith("methods"))
             for name, deps in graph.items() if name.startswith("gradmap")}
    assert not {k: v for k, v in leaks.items() if v}
    assert any(d.startswith("gradmap") for d in graph["methods.gradmap.metric"])  # the graph sees methods
