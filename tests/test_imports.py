"""The import graph of the project's packages: no circles (counting imports inside functions too),
`harness` imports no task, and an import inside a function says why in a comment."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("harness", "cnn", "gwi")


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def imported_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules an import statement loads (a `from a import b` loads a.b when b is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    loaded = set()
    for name in names:
        parts = name.split(".")
        loaded |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return loaded


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    files = module_files()
    known = set(files)
    graph: dict[str, set[str]] = {name: set() for name in files}
    uncommented = []
    for name, path in files.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= imported_modules(node, name, path.name == "__init__.py", known) - {name}
                if id(node) not in top_level and not isinstance(getattr(node, "parent", None), ast.Module):
                    nearby = lines[max(node.lineno - 3, 0): node.end_lineno]
                    if not any("#" in line for line in nearby) and not in_type_checking(tree, node):
                        uncommented.append((f"{path.relative_to(ROOT)}", node.lineno))
    return graph, uncommented


def in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, (ast.If, ast.Try)) and any(child is node for child in ast.walk(top)):
            return True  # guarded imports (try/except ImportError, if TYPE_CHECKING) are top-level in spirit
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_circles():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_harness_imports_no_task():
    graph, _ = import_graph()
    leaks = {m: sorted(d for d in deps if d.split(".")[0] in ("cnn", "gwi")) for m, deps in graph.items() if m.startswith("harness")}
    assert {m: d for m, d in leaks.items() if d} == {}


def test_imports_inside_functions_say_why():
    _, uncommented = import_graph()
    assert uncommented == []


def test_package_init_files_are_empty():
    """A package's __init__ holds at most a docstring: importing any module of a package (e.g.
    `python -m gwi.physics.synth`) must not load anything else."""
    def has_code(path: Path) -> bool:
        body = ast.parse(path.read_text()).body
        return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)

    assert {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("__init__.py") if has_code(p)} == set()
