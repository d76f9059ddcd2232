"""Every shipped run configuration loads against the schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_vae.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")
    assert cfg.train.checkpoint_every <= cfg.train.steps


def test_the_three_configs_ship() -> None:
    assert {"debug.yaml", "lsun_64_pixelvae.yaml", "lsun_256_iterative.yaml"} <= {p.name for p in CONFIGS}
