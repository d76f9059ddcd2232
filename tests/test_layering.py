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


DATA_MAY_IMPORT = ("dist_vae.schema", "dist_vae.errors", "dist_vae.files", "dist_vae.compat", "dist_vae.data")


@pytest.mark.parametrize("path", files("dist_vae/data"), ids=lambda p: p.name)
def test_data_imports_of_dist_vae_only_leaf_utilities_adapters_and_itself(path: Path) -> None:
    """Not config.py either: it composes the per-layer configs, so it imports the models."""
    for module, _ in imports(path):
        if module == "dist_vae" or module.startswith("dist_vae."):
            assert any(module == m or module.startswith(m + ".") for m in DATA_MAY_IMPORT), (
                f"{path.relative_to(ROOT)} imports {module}; data/ may import only {DATA_MAY_IMPORT}"
            )


DOCUMENTED_DESPITE_UNDERSCORE = {"_exit"}  # os._exit is public API of the standard library
REFLECTION = {"getattr", "setattr", "hasattr"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__") and name not in DOCUMENTED_DESPITE_UNDERSCORE


def _defined_names(paths: list[Path]) -> set[str]:
    """Every name the files define themselves: functions, classes, variables and attributes they assign."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return names


def test_data_touches_no_private_name_of_a_library() -> None:
    """A private attribute used under data/ is one data/ defines; torch's go through compat/torch_data.py."""
    paths = files("dist_vae/data")
    own = _defined_names(paths)
    found = []
    for path in paths:
        where = path.relative_to(ROOT)
        for module, names in imports(path):
            if not module.startswith("dist_vae"):
                found += [f"{where} imports {n}" for n in [*module.split("."), *names] if _is_private(n)]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in own:
                found.append(f"{where}:{node.lineno} uses .{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in REFLECTION:
                literal = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                found += [f"{where}:{node.lineno} reaches {n!r}" for n in literal if _is_private(str(n))]
    assert not found, found
    assert {"_shutdown_workers", "_typed_storage", "_new_shared"}.isdisjoint(own)  # no own name masks them
