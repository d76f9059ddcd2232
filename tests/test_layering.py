"""The layers, checked from the source: the declared order of dist_vae/ and tools/ (a module imports
only from its own layer and the ones below; every import statement counts, also inside a function or
under TYPE_CHECKING), no import circle, models need nothing above torch, data does not reach into the
engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.import_graph import ROOT, circles, files, import_graph, imports, module_name, upward_imports

# Lowest first. A name stands for the module and, for a package, everything under it.
LAYERS = [
    ["dist_vae", "dist_vae.errors", "dist_vae.schema", "dist_vae.files", "dist_vae.run_layout",
     "dist_vae.precision", "dist_vae.host_memory", "dist_vae.lease"],  # leaves
    ["dist_vae.compat"],
    ["dist_vae.distributed"],
    ["dist_vae.data"],
    ["dist_vae.models"],
    ["dist_vae.metrics", "dist_vae.sampling"],
    ["dist_vae.checkpoint"],
    ["dist_vae.flops"],
    ["dist_vae.step_time"],
    ["dist_vae.trackers"],
    ["dist_vae.config", "dist_vae.config_migration"],
    ["dist_vae.run_dir"],
    ["dist_vae.pretrained"],
    ["dist_vae.export"],
    ["dist_vae.engine"],
    ["dist_vae.train"],
    ["dist_vae.commands"],
    ["dist_vae.cli"],
    ["tools"],  # tools/ and tools/bench/: among themselves only without circles
]  # fmt: skip
SCOPE = ("dist_vae", "tools")
# The package's top level offers `dist_vae.load`, imported on first use (PEP 562): the one import from
# the leaves upwards, which nothing below it can reach, so no circle.
FACADE = {"dist_vae": {"dist_vae.pretrained"}}


def project_graph() -> dict[str, set[str]]:
    graph = import_graph(SCOPE)
    for module, allowed in FACADE.items():
        assert allowed <= graph[module], f"{module} no longer imports {allowed}: drop it from FACADE"
        graph[module] = graph[module] - allowed
    return graph


def test_every_top_level_module_of_dist_vae_is_placed_in_a_layer() -> None:
    declared = {name for layer in LAYERS for name in layer}
    found = [
        module_name(p) for p in (ROOT / "dist_vae").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    ]  # fmt: skip
    assert sorted(set(found) - declared) == []


def test_no_import_circle_in_dist_vae_and_tools() -> None:
    assert circles(project_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    assert upward_imports(project_graph(), LAYERS) == []


def test_the_layer_checks_catch_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks themselves, on synthetic modules: a circle through a function-level import, one
    between two scripts importing each other as siblings, and an upward import under TYPE_CHECKING."""
    sources = {
        "pkg/__init__.py": "",
        "pkg/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import Thing\n",
        "pkg/high.py": "import os\n",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def late():\n    from pkg.a import f\n",
        "scripts/x.py": "import y\n",
        "scripts/y.py": "import os\n\n\ndef late():\n    import x\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(["pkg", "scripts"], tmp_path)
    assert circles(graph) == [["pkg.a", "pkg.b"], ["scripts.x", "scripts.y"]]
    layers = [["pkg.low", "pkg.a", "pkg.b"], ["pkg.high"], ["scripts"]]
    assert upward_imports(graph, layers) == ["pkg.low -> pkg.high"]
    assert upward_imports({"pkg.high": {"pkg.low"}, "scripts.x": {"pkg.a"}}, layers) == []


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


@pytest.mark.parametrize("path", files("dist_vae/checkpoint"), ids=lambda p: p.name)
def test_checkpoint_component_imports_neither_the_run_directory_nor_the_engine(path: Path) -> None:
    for module, _ in imports(path):
        assert module != "dist_vae.run_dir" and not module.startswith("dist_vae.engine"), (
            f"{path.relative_to(ROOT)} imports {module}: the run directory and the engine call the "
            "checkpoint component, never the reverse"
        )


DATA_MAY_IMPORT = (
    "dist_vae.schema", "dist_vae.errors", "dist_vae.files", "dist_vae.lease", "dist_vae.compat",
    "dist_vae.distributed", "dist_vae.data",
)  # fmt: skip


@pytest.mark.parametrize("path", files("dist_vae/data"), ids=lambda p: p.name)
def test_data_imports_of_dist_vae_only_leaf_utilities_adapters_and_itself(path: Path) -> None:
    """Not config.py either: it composes the per-layer configs, so it imports the models."""
    for module, _ in imports(path):
        if module == "dist_vae" or module.startswith("dist_vae."):
            assert any(module == m or module.startswith(m + ".") for m in DATA_MAY_IMPORT), (
                f"{path.relative_to(ROOT)} imports {module}; data/ may import only {DATA_MAY_IMPORT}"
            )


MAX_LINES = 300


def test_no_source_file_is_over_the_line_limit() -> None:
    """A module past 300 lines holds more than one job: split it by concern."""
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for folder in ("dist_vae", "tools", "tests")
        for path in files(folder)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, f"over {MAX_LINES} lines:\n" + "\n".join(long)
