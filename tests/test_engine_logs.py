"""One short run with injected NaN and spike losses: both updates skipped and counted; logs and samples.
A run whose updates are all non-finite stops with exit code 4; bad configurations exit 2."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.checkpoint import complete_checkpoints
from dist_vae.config import load_config
from dist_vae.flops import flops_per_image
from dist_vae.models import build_model
from dist_vae.run_layout import RunDir
from dist_vae.train import main
from tests.engine_util import assert_same, check, checkpoint_contents, python_cmd, run, train_args

OTHER_SKIPS = {"shards": 0, "samples": 0, "overflow": 0}  # no data faults, no fp16 overflow
SCALARS = [
    "train/loss", "train/bpd", "train/kl", "train/rec", "train/grad_norm", "lr/main", "perf/img_per_s",
    "perf/data_wait_fraction", "perf/img_per_s_per_rank", "skipped/nonfinite", "skipped/overflow",
    "skipped/spike", "val/bpd", "data/skipped_shards", "data/skipped_samples",
]  # fmt: skip
PEAK = 1e12  # train.peak_flops: a CPU has no datasheet figure


@pytest.fixture(scope="module")
def bad_run(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, a checkpoint after each; update 1 gets a NaN loss and update 6 a 1000x loss spike."""
    run_dir = tmp_path_factory.mktemp("bad_run")
    overrides = ["train.steps=8", "train.checkpoint_every=1", "train.keep_checkpoints=8", "train.log_every=1",
                 "train.eval_every=4", "train.sample_every=8", "train.spike_warmup=3",
                 "train.spike_k=50"]  # fmt: skip
    check(run(python_cmd(run_dir, demo_shards, *overrides), HARNESS_NAN_AT="1", HARNESS_SPIKE_AT="6"))
    return run_dir


def test_nan_and_spike_updates_are_skipped_and_counted(bad_run: Path) -> None:
    assert [step for step, _ in complete_checkpoints(bad_run)] == list(range(1, 9))
    ckpt = {step: checkpoint_contents(path) for step, path in complete_checkpoints(bad_run)}
    assert ckpt[1]["state.json"]["meta"]["skipped"] == {**OTHER_SKIPS, "nonfinite": 0, "spike": 0}
    assert ckpt[2]["state.json"]["meta"]["skipped"] == {**OTHER_SKIPS, "nonfinite": 1, "spike": 0}
    assert ckpt[6]["state.json"]["meta"]["skipped"] == {**OTHER_SKIPS, "nonfinite": 1, "spike": 0}
    assert ckpt[8]["state.json"]["meta"]["skipped"] == {**OTHER_SKIPS, "nonfinite": 1, "spike": 1}
    for before, after in [(1, 2), (6, 7)]:  # a skipped update leaves weights, moments and EMA as they were
        for file in ("model.safetensors", "optimizer.safetensors", "ema.safetensors"):
            assert_same(ckpt[before][file], ckpt[after][file])
    for before, after in [(2, 3), (7, 8)]:  # and the next one is applied normally
        weights = ckpt[after]["model.safetensors"]
        assert all(torch.isfinite(w).all() for w in weights.values())
        assert any(not torch.equal(w, weights[k]) for k, w in ckpt[before]["model.safetensors"].items())


def test_mfu_is_logged_against_the_peak_and_the_counted_flops(demo_shards: Path, tmp_path: Path) -> None:
    assert main(train_args(tmp_path, demo_shards, "train.steps=3", "train.log_every=1",
                           f"train.peak_flops={PEAK:g}")) == 0  # fmt: skip
    events = EventAccumulator(str(RunDir(tmp_path).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    cfg = load_config(RunDir(tmp_path).config)
    flops = flops_per_image(build_model(cfg.model, cfg.data.resolution), cfg.data.resolution)
    rates = [e.value for e in events.Scalars("perf/img_per_s_per_rank")]
    mfu = [e.value for e in events.Scalars("perf/mfu")]
    assert len(mfu) == 3 and min(mfu) > 0
    assert mfu == pytest.approx([rate * flops / PEAK for rate in rates], rel=1e-5)


def test_tensorboard_holds_scalars_and_samples(bad_run: Path) -> None:
    events = EventAccumulator(str(RunDir(bad_run).tensorboard), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    missing = [tag for tag in SCALARS if tag not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; have {tags['scalars']}"
    assert [e.value for e in events.Scalars("skipped/nonfinite")] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert [e.value for e in events.Scalars("skipped/spike")] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert [e.step for e in events.Scalars("val/bpd")] == [4, 8]
    assert all(0 < e.value < 100 for e in events.Scalars("val/bpd"))
    assert [e.step for e in events.Scalars("lr/main")] == list(range(1, 9))
    assert "samples" in tags["images"]
    assert sorted(p.name for p in RunDir(bad_run).samples.glob("*.png")) == ["step-00000008.png"]
    resolved = load_config(RunDir(bad_run).config)
    assert (resolved.train.steps, resolved.train.spike_k, resolved.model.channels) == (8, 50.0, 4)
    assert RunDir(bad_run).marker("done").read_text().startswith("step 8")


def test_a_diverged_run_stops_with_exit_4_and_names_the_last_checkpoint(
    demo_shards: Path, tmp_path: Path
) -> None:
    overrides = ["train.lr=1e6", "train.steps=40", "train.max_nonfinite_skips=5", "train.checkpoint_every=1",
                 "train.log_every=1", "train.sample_every=1000"]  # fmt: skip
    proc = run(python_cmd(tmp_path, demo_shards, *overrides))
    check(proc, 4)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    match = re.fullmatch(
        r"error: training diverged: 5 consecutive non-finite updates since step (\d+); "
        r"last good checkpoint: (.+)",
        errors[0],
    )
    assert match, errors[0]
    stopped = int(match.group(1)) + 4
    # Nothing is saved at the step that ended the run: the newest checkpoint is the one before it.
    assert complete_checkpoints(tmp_path)[-1] == (stopped - 1, Path(match.group(2)))
    assert not RunDir(tmp_path).marker("done").exists() and not RunDir(tmp_path).marker("requeue").exists()
    # The cluster script reads this marker and does not requeue a run that would only diverge again.
    assert (
        RunDir(tmp_path)
        .marker("diverged")
        .read_text()
        .startswith(f"step {stopped}\nreason training diverged")
    )
    events = EventAccumulator(str(RunDir(tmp_path).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    norms = {e.step: e.value for e in events.Scalars("train/grad_norm")}
    assert max(norms) == stopped
    assert not any(math.isfinite(norms[step]) for step in range(stopped - 4, stopped + 1))
    assert [e.value for e in events.Scalars("skipped/nonfinite")][-1] >= 5


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.bogus=1", ["unknown key 'train.bogus'", "ema_decay"]),
        ("train.precision=fp8", ["train.precision", "fp8", "bf16"]),
        ("resume=/nonexistent/ckpt", ["resume", "/nonexistent/ckpt", "COMPLETE"]),
        ("data.path=/nonexistent/shards", ["/nonexistent/shards"]),
        ("train.batch_size=8", ["'train.batch_size' was removed", "data.batch_size"]),
    ],
)
def test_bad_configuration_fails_clearly(
    override: str, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_args(tmp_path, tmp_path, override)) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
    assert not RunDir(tmp_path).config.exists()
