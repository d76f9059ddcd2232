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
        (["data.batch_size=-5"], ["data.batch_size", "-5", ">= 1"]),
        (["train.batch_size=0"], ["'train.batch_size' was removed", "data.batch_size", "per-rank"]),
        (["train.max_nonfinite_skips=0"], ["train.max_nonfinite_skips", ">= 1"]),
        (["train.peak_flops=-1"], ["train.peak_flops", ">= 0"]),
        (["train.compile=maybe"], ["train.compile", "maybe"]),
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


def test_an_old_config_with_train_batch_size_is_told_what_replaced_it(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  batch_size: 8\ntrain:\n  steps: 3\n  batch_size: 4\n")
    removed = r"old\.yaml: key 'train\.batch_size' was removed; use data\.batch_size"
    with pytest.raises(ConfigError, match=removed):
        load_config(old)
    cfg = load_config(None, ["train.compile=true", "train.peak_flops=1e12"])
    assert (cfg.train.compile, cfg.train.peak_flops, cfg.train.max_nonfinite_skips) == (True, 1e12, 10)
    assert load_config(None).train.peak_flops is None
