"""One short run with an injected NaN loss: the update is skipped and counted, logs and samples exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.engine.checkpoint import complete_checkpoints
from dist_vae.train import main
from tests.engine_util import assert_same, check, checkpoint_contents, python_cmd, run, train_args

SCALARS = [
    "train/loss", "train/bpd", "train/grad_norm", "lr/main", "perf/img_per_s",
    "perf/data_wait_fraction", "skipped/nonfinite", "skipped/spike", "val/bpd",
]  # fmt: skip


@pytest.fixture(scope="module")
def nan_run(demo_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 steps; the training forward of step index 1 (the second update) returns a NaN loss."""
    run_dir = tmp_path_factory.mktemp("nan_run")
    overrides = ["train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.log_every=1",
                 "train.eval_every=3", "train.sample_every=3"]  # fmt: skip
    check(run(python_cmd(run_dir, demo_shards, *overrides), HARNESS_NAN_AT="1"))
    return run_dir


def test_nan_update_is_skipped_and_counted(nan_run: Path) -> None:
    assert [step for step, _ in complete_checkpoints(nan_run)] == [1, 2, 3]
    step1, step2, step3 = (checkpoint_contents(path) for _, path in complete_checkpoints(nan_run))
    assert step1["trainer.pt"]["skipped"] == {"nonfinite": 0, "spike": 0}
    assert step2["trainer.pt"]["skipped"] == {"nonfinite": 1, "spike": 0}
    # The skipped update left weights, optimizer moments and EMA as they were...
    assert_same(step1["pytorch_model.bin"], step2["pytorch_model.bin"])
    assert_same(step1["optimizer.bin"]["state"], step2["optimizer.bin"]["state"])
    assert_same(step1["trainer.pt"]["ema"], step2["trainer.pt"]["ema"])
    # ...and the next one was applied normally.
    after = step3["pytorch_model.bin"]
    assert all(torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(w, after[k]) for k, w in step2["pytorch_model.bin"].items())


def test_tensorboard_holds_scalars_and_samples(nan_run: Path) -> None:
    events = EventAccumulator(str(nan_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    missing = [tag for tag in SCALARS if tag not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; have {tags['scalars']}"
    assert [e.value for e in events.Scalars("skipped/nonfinite")] == [0.0, 1.0, 1.0]
    assert [e.step for e in events.Scalars("val/bpd")] == [3]
    assert 0 < events.Scalars("val/bpd")[0].value < 16
    assert "samples" in tags["images"]
    pngs = sorted(p.name for p in (nan_run / "samples").glob("*.png"))
    assert pngs == ["step-00000003.png"]
    assert (nan_run / "config.yaml").read_text().count("steps: 3") == 1
    assert (nan_run / "done").read_text().startswith("step 3")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.bogus=1", ["unknown key 'train.bogus'", "ema_decay"]),
        ("train.precision=fp8", ["train.precision", "fp8", "bf16"]),
        ("resume=/nonexistent/ckpt", ["resume", "/nonexistent/ckpt", "COMPLETE"]),
    ],
)
def test_bad_configuration_fails_clearly(
    override: str, fragments: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_args(tmp_path, tmp_path, override)) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "config.yaml").exists()
