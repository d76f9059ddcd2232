"""No private names of torch, DeepSpeed or Accelerate outside the adapters in dist_vae/compat/, and
only public names and hooks of dist_vae in the tools, checked from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.import_graph import ROOT, files, imports


@pytest.mark.parametrize("path", files("tools"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_import_no_private_names(path: Path) -> None:
    for module, names in imports(path):
        if module.startswith("dist_vae"):
            private = [n for n in [*module.split("."), *names] if n.startswith("_") and n != "__future__"]
            assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"


LIBRARIES = {"torch", "deepspeed", "accelerate"}
COMPAT = ROOT / "dist_vae" / "compat"
# Every attribute access is checked in these folders (outside compat/).
ATTRIBUTE_SCOPE = ["dist_vae", "tools"]
DOCUMENTED_DESPITE_UNDERSCORE = {"_exit"}  # os._exit is public API of the standard library
# Library fields without a leading underscore that are private all the same (the adapters name them).
PRIVATE_FIELDS = {
    "bit16_groups", "bf16_groups", "averaged_gradients", "all_grad_tensors", "micro_step_id", "cpu_offload",
    "global_steps", "global_samples", "micro_steps", "skipped_steps",
    "deepspeed_engine_wrapped",
}  # fmt: skip


REFLECTION = {"getattr", "setattr", "hasattr"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def outside_compat(folder: str) -> list[Path]:
    return [p for p in files(folder) if COMPAT not in p.parents]


def scoped(paths: list[str]) -> list[Path]:
    return [q for p in paths for q in ([ROOT / p] if p.endswith(".py") else outside_compat(p))]


def private_imports(path: Path) -> list[str]:
    """`module: names` for each import of a private module or name of torch, DeepSpeed or Accelerate."""
    found = []
    for module, names in imports(path):
        parts = module.split(".")
        if parts[0] in LIBRARIES and any(map(is_private, parts + names)):
            found.append(f"{module}: {', '.join(names) or '(module)'}")
    return found


def private_attributes(path: Path) -> list[str]:
    """`line: name` for each `obj._name` not on self/cls, and each access (also through getattr,
    setattr, hasattr) of a library field in PRIVATE_FIELDS."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            owner = node.value.id if isinstance(node.value, ast.Name) else ""
            private = is_private(node.attr) and node.attr not in DOCUMENTED_DESPITE_UNDERSCORE
            if (private and owner not in {"self", "cls"}) or node.attr in PRIVATE_FIELDS:
                found.append(f"{node.lineno}: {node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in REFLECTION:
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and name.value in PRIVATE_FIELDS:
                found.append(f"{node.lineno}: {name.value}")
    return found


@pytest.mark.parametrize(
    "path", outside_compat("dist_vae") + files("tools"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_only_the_adapters_import_private_names_of_the_libraries(path: Path) -> None:
    found = private_imports(path)
    assert not found, f"{path.relative_to(ROOT)} imports private names {found}; go through dist_vae/compat/"


@pytest.mark.parametrize("path", scoped(ATTRIBUTE_SCOPE), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_adapters_touch_private_attributes(path: Path) -> None:
    found = private_attributes(path)
    assert not found, (
        f"{path.relative_to(ROOT)} touches private attributes {found}; go through dist_vae/compat/"
    )


def test_the_private_name_checks_catch_what_they_forbid(tmp_path: Path) -> None:
    """The checks themselves, on a file holding each kind of access they forbid and two they allow."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from torch.utils.data._utils import worker\nfrom torch._subclasses import fake_tensor\n"
        "import deepspeed._private\nfrom accelerate.utils import _hidden\n"
        "it._shutdown_workers()\nx._typed_storage()._new_shared(4)\ntorch._foreach_lerp_(a, b, 0.5)\n"
        "zero.bit16_groups\ngetattr(zero, 'bf16_groups')\nself._fine\nx.__class__\n"
    )
    assert len(private_imports(probe)) == 4
    assert sorted(found.split(": ")[1] for found in private_attributes(probe)) == sorted(
        [
            "_shutdown_workers",
            "_new_shared",
            "_typed_storage",
            "_foreach_lerp_",
            "bit16_groups",
            "bf16_groups",
        ]
    )


def _is_private(name: str) -> bool:
    return is_private(name) and name not in DOCUMENTED_DESPITE_UNDERSCORE


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


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


@pytest.mark.parametrize("path", files("tools"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_use_public_hooks_not_private_members(path: Path) -> None:
    """No subclass of a dist_vae class (e.g. the Trainer: it has `before_step`), and a `_name` read only
    on self or on a library module, never on a dist_vae object."""
    found = imports(path)
    ours = {  # the adapters re-export library classes (TorchDispatchMode): those may be subclassed
        name for module, names in found
        if module.startswith("dist_vae") and not module.startswith("dist_vae.compat") for name in names
    }  # fmt: skip
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
