"""log.trackers: one run logs to TensorBoard, wandb (offline) and MLflow (a local file store) at once;
each is read back through its own files or client and carries the scalars and the sample grids that
TensorBoard carries; a resume appends to the same wandb and MLflow runs; a missing package stops the
run before any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_vae.errors import ExitCode
from dist_vae.run_layout import RunDir
from dist_vae.schema import ConfigError
from dist_vae.trackers import LogConfig, check_trackers

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.latent_dim=4", "model.nr_resnet=1", "model.nr_filters=8", "model.nr_mix=2", "model.n_stages=2",
        "model.encoder_channels=8"]  # fmt: skip

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def train_args(run_dir: Path, shards: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", "configs/debug.yaml", f"run_dir={run_dir}",
           f"data.path={shards}", "data.resolution=8", "data.batch_size=4", "data.num_workers=0",
           "data.shuffle_group=2", *TINY, f"train.steps={steps}", "train.checkpoint_every=2",
           "train.eval_every=100", "train.sample_every=2", "train.sample_count=2", "train.log_every=1",
           "train.warmup=1", "log.trackers=[tensorboard,wandb,mlflow]", *extra]  # fmt: skip


def train(
    run_dir: Path, shards: Path, steps: int, *extra: str, env: dict[str, str]
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "dist_vae/train.py", *train_args(run_dir, shards, steps, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tensorboard_tags(run: RunDir) -> tuple[set[str], set[str], set[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tensorboard), size_guidance={"scalars": 0, "images": 0}).Reload()
    steps = {e.step for e in events.Scalars("train/bpd")}
    return set(events.Tags()["scalars"]), set(events.Tags()["images"]), steps


def wandb_records(path: Path) -> list[bytes]:
    """The records of a wandb run file: a 7-byte header (":W&B", 0xBEE1, version 0), then LevelDB's
    log format (32 KiB blocks; records of a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    data, records, pending, block = path.read_bytes(), [], b"", 32768
    assert data[:4] == b":W&B", path
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def wandb_history(run: RunDir) -> tuple[list[dict], list[Path], dict]:
    """Every history row of every offline run file under RUN_DIR/wandb, the images it saved and the
    configuration it recorded."""
    from wandb.proto import wandb_internal_pb2

    rows, config = [], {}
    for path in sorted(run.root.glob("wandb/offline-run-*/run-*.wandb")):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})  # fmt: skip
            elif record.WhichOneof("record_type") == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return rows, sorted(run.root.glob("wandb/offline-run-*/files/media/images/samples_*.png")), config


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("trackers")
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true"}  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    out = tmp_path_factory.mktemp("shards")
    cmd = [sys.executable, "tools/make_shards.py", "--source", "demo:20", "--out", str(out), "--resolution",
           "8", "--val-fraction", "0.2", "--workers", "1", "--no-progress"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return out


def test_wandb_and_mlflow_carry_what_tensorboard_carries_and_a_resume_appends(
    tmp_path: Path, shards: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir(tmp_path / "run")
    first = train(run.root, shards, 2, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads(run.trackers.read_text())
    assert set(ids) == {"wandb", "mlflow"}
    second = train(run.root, shards, 4, env=env)  # resumes from step 2
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(run.trackers.read_text()) == ids

    scalars, images, steps = tensorboard_tags(run)
    assert steps == {1, 2, 3, 4} and images == {"samples"}

    rows, pictures, config = wandb_history(run)
    assert config["train.steps"] == 2 and config["model.kind"] == "pixel_vae"  # as the run was created
    logged = {key for row in rows for key in row if not key.startswith("_")}
    assert scalars <= logged, scalars - logged
    assert sorted(row["_step"] for row in rows if "train/bpd" in row) == [1, 2, 3, 4]
    assert [row["_step"] for row in rows if "samples/filenames" in row] == [2, 4] and len(pictures) == 2
    assert len(list(run.root.glob(f"wandb/offline-run-*-{ids['wandb']}"))) == 2  # one run id, two sessions

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    mlrun = client.get_run(ids["mlflow"])
    assert scalars <= set(mlrun.data.metrics)
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train/bpd")] == [1, 2, 3, 4]
    assert mlrun.data.params["train.steps"] == "2" and mlrun.data.params["model.kind"] == "pixel_vae"
    artifacts = [a.path for a in client.list_artifacts(ids["mlflow"], "images")]
    assert len([a for a in artifacts if "samples" in a and a.endswith(".png")]) == 2


def test_a_tracker_whose_package_is_missing_stops_before_any_step(
    tmp_path: Path, shards: Path, env: dict[str, str]
) -> None:
    run = RunDir(tmp_path / "run")
    args = train_args(run.root, shards, 2)
    # The trainer in a process where `import wandb` fails, as it does where the package is not installed.
    code = (
        f"import sys; sys.modules['wandb'] = None; from dist_vae.train import main; sys.exit(main({args!r}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == ExitCode.REFUSED, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: log.trackers names wandb, whose package is not installed: pip install 'dist-vae[wandb]'"
    ]
    assert not run.checkpoints.exists() and not run.tensorboard.exists()
    with pytest.raises(ConfigError, match=r"^bad value 'comet' in 'log.trackers'"):
        check_trackers(LogConfig(trackers=["tensorboard", "comet"]))
