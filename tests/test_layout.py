"""The package's shape: imports inside fairbook run one way (no cycle, counting imports inside functions too), the
README's layout table names every module, and ruff (configured in pyproject.toml) is clean."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fairbook"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The fairbook modules that ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}
    # a package's own __init__ re-exporting its submodules is not a dependency of those submodules on the package
    return {name: {d for d in deps if not name.startswith(f"{d}.")} for name, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert {"fairbook.protocol", "fairbook.methods.fairclip", "fairbook.train"} <= set(graph)
    assert "fairbook.train" in graph["fairbook.protocol"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("low,high", [
    ("fairbook.data.fairvlmed", "fairbook.train"), ("fairbook.metrics", "fairbook.models.clip"),
    ("fairbook.train", "fairbook.methods.fairclip"), ("fairbook.methods.fair_moe", "fairbook.protocol"),
    ("fairbook.results", "fairbook.protocol"), ("fairbook.protocol", "fairbook.explain"),
])
def test_lower_layers_never_import_higher_ones(low, high):
    graph = import_graph()

    def reaches(node, target, seen=()):
        return node == target or any(reaches(d, target, (*seen, node)) for d in graph[node] if d not in seen)

    assert not reaches(low, high), f"{low} depends on {high}"


def test_the_readme_layout_table_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    top_level = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")} | {
        p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(name for name in top_level if f"`{name}`" not in table)
    assert not missing, f"README layout table lacks {missing}"


def test_ruff_is_clean_on_package_notebooks_tests_and_bench():
    root = PACKAGE.parent
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "fairbook", "notebooks", "tests", "bench"],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_the_package_cites_papers_and_its_own_docs_never_files_outside_the_repository():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{i}" for folder in ("fairbook", "notebooks", "bench")
                 for p in (PACKAGE.parent / folder).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "shared/" in line or "reference/" in line]
    assert offenders == []
