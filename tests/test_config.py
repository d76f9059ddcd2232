from pathlib import Path

import pytest

from dist_vae.config import ConfigError, load_config, to_yaml


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  batch_size: 8\n  resolution: 64\nmodel:\n  kind: iterative_vae\n")
    cfg = load_config(path, ["data.batch_size=4", "model.latent_dims=[8,8]"])
    assert (cfg.data.batch_size, cfg.data.resolution, cfg.model.kind) == (4, 64, "iterative_vae")
    assert cfg.model.latent_dims == [8, 8]
    assert load_config(None, []).data.batch_size == 16


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.precision=bf16", "seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.bogus=1"], ["unknown key", "data.bogus", "batch_size"]),
        (["bogus=1"], ["unknown key", "bogus", "run_dir"]),
        (["data.batch_size=abc"], ["data.batch_size", "abc", "int"]),
        (["model.kind=foo"], ["model.kind", "foo", "pixel_vae", "iterative_vae"]),
        (["model.reg=kl"], ["model.reg", "kl", "mmd", "stein"]),
        (["train.precision=fp8"], ["train.precision", "fp8", "bf16"]),
        (["data.batch_size=0"], ["data.batch_size", ">= 1"]),
        (["train.lr"], ["train.lr", "key=value"]),
    ],
)
def test_bad_overrides_name_key_value_and_allowed(overrides: list[str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  resolution: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key 'trian'"):
        load_config(typo)
