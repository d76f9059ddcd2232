"""The import graph of the project's modules, read from the source (every import statement counts,
at module level, inside a function or under TYPE_CHECKING), and the two checks tests/test_layering.py
makes on it: import circles and imports from a lower layer to a higher one."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def files(folder: str, root: Path = ROOT) -> list[Path]:
    paths = sorted((root / folder).rglob("*.py"))
    assert paths, f"no Python files under {folder}"
    return paths


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement of a file; relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = ".".join(path.relative_to(root).with_suffix("").parts[:-1]) if node.level else ""
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            found.append((module, [alias.name for alias in node.names]))
    return found


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(folders: Iterable[str], root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the modules of `folders` it imports}. `from a import b` is an edge to a.b where that
    is a module, else to a; a bare `import x` of a script's sibling file x.py is an edge to it."""
    paths = {module_name(p, root): p for folder in folders for p in files(folder, root)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for module, names in imports(path, root):
            sibling = module_name(path.parent / f"{module}.py", root) if "." not in module else ""
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in paths]
            if len(targets) < len(names) or not names:
                targets.append(sibling if sibling in paths else module)
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_of(module: str, layers: Sequence[Sequence[str]]) -> int | None:
    """The index of the layer holding the longest of its names that is `module` or a package above it."""
    best: tuple[int, int] | None = None
    for i, names in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (i, len(name))
    return best[0] if best else None


def upward_imports(graph: dict[str, set[str]], layers: Sequence[Sequence[str]]) -> list[str]:
    """`a -> b` for every import of a module b in a higher layer than a's."""
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer_of(module, layers), layer_of(target, layers)
            if here is not None and there is not None and there > here:
                found.append(f"{module} -> {target}")
    return found
