"""The layers, checked from the source: models need nothing above torch, data does not reach into the
engine, and the tools use only public names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import statement of a file; relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            found.append((module, [alias.name for alias in node.names]))
    return found


def files(folder: str) -> list[Path]:
    paths = sorted((ROOT / folder).rglob("*.py"))
    assert paths, f"no Python files under {folder}"
    return paths


@pytest.mark.parametrize("path", files("dist_vae/models"), ids=lambda p: p.name)
def test_models_import_only_torch_numpy_the_standard_library_and_themselves(path: Path) -> None:
    for module, _ in imports(path):
        top = module.split(".")[0]
        allowed = (
            top in {"torch", "numpy"}
            or top in sys.stdlib_module_names
            or module == "dist_vae.schema"
            or module == "dist_vae.models"
            or module.startswith("dist_vae.models.")
        )
        assert allowed, f"{path.relative_to(ROOT)} imports {module}"


@pytest.mark.parametrize("path", files("dist_vae/data"), ids=lambda p: p.name)
def test_data_imports_no_engine_and_no_model(path: Path) -> None:
    for module, _ in imports(path):
        assert not module.startswith(("dist_vae.engine", "dist_vae.models")), (
            f"{path.relative_to(ROOT)} imports {module}"
        )


@pytest.mark.parametrize("path", files("tools"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_import_no_private_names(path: Path) -> None:
    for module, names in imports(path):
        if module.startswith("dist_vae"):
            private = [n for n in [*module.split("."), *names] if n.startswith("_") and n != "__future__"]
            assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


@pytest.mark.parametrize("path", files("tools"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_use_public_hooks_not_private_members(path: Path) -> None:
    """No subclass of a dist_vae class (e.g. the Trainer: it has `before_step`), and a `_name` read only
    on self or on a library module, never on a dist_vae object."""
    found = imports(path)
    ours = {name for module, names in found if module.startswith("dist_vae") for name in names}
    libraries = {
        alias.split(".")[0] for module, names in found if not module.startswith("dist_vae")
        for alias in [module, *names]
    }  # fmt: skip
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef):
            bases = {base.id for base in node.bases if isinstance(base, ast.Name)}
            assert not bases & ours, f"{path.relative_to(ROOT)}: {node.name} subclasses {bases & ours}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = _root(node.value)
            allowed = isinstance(root, ast.Name) and (root.id == "self" or root.id in libraries)
            assert allowed, f"{path.relative_to(ROOT)}:{node.lineno} reads the private member {node.attr}"
