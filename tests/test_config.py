from pathlib import Path

import pytest

from dist_vae.config import ConfigError, load_config, to_yaml
from dist_vae.data.config import DataConfig
from dist_vae.models import default_model_kind, model_config_class, model_kinds


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


def test_model_keys_of_another_kind_are_refused_naming_the_kind_and_its_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.refine_steps=3"])
    assert "model.refine_steps" in str(info.value) and "model.kind=pixel_vae" in str(info.value)
    assert "nr_filters" in str(info.value)
    with pytest.raises(ConfigError, match=r"model.kind=iterative_vae.*refine_steps"):
        load_config(None, ["model.kind=iterative_vae", "model.reg=mmd"])


def test_switching_kind_starts_the_model_section_afresh_and_saves_only_its_keys(tmp_path: Path) -> None:
    # debug.yaml sets PixelVAE keys; choosing the iterative VAE after it drops them.
    cfg = load_config(Path("configs/debug.yaml"), ["model.kind=iterative_vae", "model.refine_steps=2"])
    assert cfg.model.refine_steps == 2 and not hasattr(cfg.model, "nr_filters")
    saved = to_yaml(cfg)
    assert "refine_steps: 2" in saved and "nr_filters" not in saved and "reg:" not in saved
    path = tmp_path / "config.yaml"
    path.write_text(saved)
    assert load_config(path) == cfg


def test_bounds_of_model_fields_are_checked_from_their_metadata() -> None:
    with pytest.raises(ConfigError, match=r"'model.refine_steps'; expected a value >= 1"):
        load_config(None, ["model.kind=iterative_vae", "model.refine_steps=0"])
    with pytest.raises(ConfigError, match=r"'model.mode'; expected one of \['greedy', 'joint'\]"):
        load_config(None, ["model.kind=iterative_vae", "model.mode=lazy"])


def test_the_default_model_is_the_registrys_first_kind_and_the_data_keys_are_datas_own() -> None:
    cfg = load_config(None)
    assert default_model_kind() == model_kinds()[0] == cfg.model.kind == "pixel_vae"
    assert type(cfg.model) is model_config_class("pixel_vae") and type(cfg.data) is DataConfig
