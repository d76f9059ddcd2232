"""One test per older config format that dist_vae/config_migration.py brings up to date or refuses."""

from pathlib import Path

import pytest

from dist_vae.config import ConfigError, load_config

FORMAT2_RUN = Path(__file__).resolve().parent / "fixtures" / "checkpoint_format2" / "pixel_vae"


def test_removed_keys_are_refused_naming_what_replaced_them(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  batch_size: 8\ntrain:\n  steps: 3\n  batch_size: 4\n")
    removed = r"old\.yaml: key 'train\.batch_size' was removed; use data\.batch_size"
    with pytest.raises(ConfigError, match=removed):
        load_config(old)
    with pytest.raises(ConfigError, match=r"'data\.shuffle_buffer' was removed; use data\.shuffle_group"):
        load_config(None, ["data.shuffle_buffer=100"])


def test_train_compile_true_and_false_load_as_on_and_off(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.compile=true", "train.peak_flops=1e12"])
    assert (cfg.train.compile, cfg.train.peak_flops, cfg.train.max_nonfinite_skips) == ("on", 1e12, 10)
    assert load_config(None).train.peak_flops is None
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  compile: true\n")
    assert load_config(old).train.compile == "on"
    assert load_config(old, ["train.compile=false"]).train.compile == "off"
    assert load_config(FORMAT2_RUN / "config.yaml").train.compile == "off"  # a real run's `compile: false`


def test_old_flat_run_configs_load_when_foreign_keys_sit_at_their_defaults(tmp_path: Path) -> None:
    """config.yaml files written before the per-model sections hold every kind's keys."""
    old = (
        "model:\n  kind: iterative_vae\n  reg: mmd\n  latent_dim: 64\n  nr_resnet: 5\n  nr_filters: 160\n"
        "  nr_mix: 10\n  n_stages: 3\n  dropout: 0.5\n  encoder_channels: 64\n  alpha: 1.0\n"
        "  lambda_: 1000.0\n  critic_hidden: 256\n  refine_steps: 2\n  latent_dims: [4, 4]\n  mode: greedy\n"
        "  channels: 8\n  rec_weight: 16.0\n  kl_warmup: 0.0\n  blocks: 1\n"
    )
    path = tmp_path / "config.yaml"
    path.write_text(old)
    cfg = load_config(path)
    assert (cfg.model.kind, cfg.model.refine_steps, cfg.model.latent_dims) == ("iterative_vae", 2, [4, 4])
    path.write_text(old.replace("nr_filters: 160", "nr_filters: 32"))
    with pytest.raises(
        ConfigError, match=r"config.yaml: unknown key 'model.nr_filters' for model.kind=iterative"
    ):
        load_config(path)
