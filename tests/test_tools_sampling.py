"""tools/sample.py and tools/evaluate.py on run directories that dist_vae/train.py made."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_vae.commands.sample import draw
from dist_vae.run_dir import load_run
from dist_vae.run_layout import RunDir
from tests.engine_util import LAUNCH, free_port

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PIXEL = [
    "model.latent_dim=4",
    "model.nr_resnet=1",
    "model.nr_filters=8",
    "model.nr_mix=2",
    "model.n_stages=2",
]
TINY = {
    "pixel_vae": [*PIXEL, "model.encoder_channels=8"],
    "iterative_vae": ["model.channels=4", "model.latent_dims=[2]", "model.refine_steps=3"],
}
# 8 px: the PixelVAE samples pixel by pixel, so its sampling and evaluation cost a quarter of 16 px's.
RESOLUTION = 8


def run(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    args = ["--source", "demo:40", "--out", str(out), "--resolution", str(RESOLUTION),
            "--val-fraction", "0.3", "--workers", "1", "--no-progress"]  # fmt: skip
    run("tools/make_shards.py", *args)
    return out


@pytest.fixture(scope="module", params=["pixel_vae", "iterative_vae"])
def run_dir(request: pytest.FixtureRequest, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    run(
        "dist_vae/train.py", "--config", "configs/debug.yaml", f"run_dir={path}", f"data.path={shards}",
        f"data.resolution={RESOLUTION}", "data.batch_size=4", "data.num_workers=0", "data.shuffle_group=2",
        f"model.kind={kind}", *TINY[kind], "train.steps=4", "train.checkpoint_every=2", "train.eval_every=4",
        "train.sample_every=4", "train.sample_count=2", "train.warmup=1", "train.ema_decay=0.9",
    )  # fmt: skip
    return path


# One set of evaluation arguments for one and two processes, so that both tests read one evaluation
# by one process (per model kind) instead of running their own.
EVAL_ARGS = ["--iw-samples", "3", "--batch-size", "3", "--fuzz-samples", "2", "--chain-steps", "2",
             "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the run with the eval.json that tools/evaluate.py wrote on one process."""
    path = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(run_dir, path)
    run("tools/evaluate.py", str(path), *EVAL_ARGS)
    return path


@pytest.mark.slow
def test_sample_writes_grids_of_the_expected_size(run_dir: Path, tmp_path: Path) -> None:
    run("tools/sample.py", str(run_dir), "--n", "3", "--chain-steps", "2", "--ema", "--out", str(tmp_path))
    cell = RESOLUTION + 2
    sizes = {name: Image.open(tmp_path / name).size for name in ("chain_data.png", "chain_noise.png")}
    assert set(sizes.values()) == {(3 * cell + 2, 3 * cell + 2)}  # K + 1 = 3 columns, 3 chains
    if "kind: pixel_vae" in RunDir(run_dir).config.read_text():
        assert Image.open(tmp_path / "ancestral.png").size == (3 * cell + 2, cell + 2)  # one row
    else:  # one row per sample, T = 3 steps left to right
        assert Image.open(tmp_path / "ancestral.png").size == (3 * cell + 2, 3 * cell + 2)


@pytest.mark.slow
def test_evaluate_writes_eval_json_over_the_whole_val_split(evaluated: Path, shards: Path) -> None:
    result = json.loads(RunDir(evaluated).latest_eval.read_text())
    val = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["count"]
    assert result["images"] == result["mi_images"] == val and result["processes"] == 1
    assert result["step"] == 4 and 0 < result["elbo_bpd"] < 50
    assert result["ema"] is True  # the default when the run kept EMA weights
    assert result["iw_bpd"] is not None and result["iw_samples"] == 3
    assert result["mi"] is not None and result["mi"] <= math.log(val) + 1e-6
    assert 0 <= result["active_units"] <= result["latent_dim"]
    fuzz = result["fuzziness"]
    assert fuzz["data_laplacian_var"] > 0
    assert [len(v) for v in fuzz["chain_laplacian_var_per_step"].values()] == [3, 3]  # x_0 .. x_2
    assert fuzz["data_chain_change_per_step"][0] == 0
    pixel = "kind: pixel_vae" in RunDir(evaluated).config.read_text()
    for key in ("sample_laplacian_var", "reconstruction_laplacian_var", "reconstruction_mse"):
        assert len(fuzz[f"{key}_per_step"]) == (1 if pixel else 3)  # generation steps
    if pixel:
        assert result["latent_dim"] == 4 and fuzz["decoder_spread"] >= 0
    else:  # every step's latents; the canvases are deterministic given z
        assert result["latent_dim"] == 2 * 3 and fuzz["decoder_spread"] == 0


def accelerate(*args: str) -> list[str]:
    return [*LAUNCH, "--config_file",
            "configs/accelerate/cpu_debug.yaml", "--num_processes", "2", "--main_process_port",
            str(free_port()), *args]  # fmt: skip


@pytest.mark.slow
def test_evaluate_on_two_processes_covers_the_split_once_and_matches_one_process(
    run_dir: Path, evaluated: Path, tmp_path: Path
) -> None:
    """Each process takes its share; the merged numbers equal one process's, except the parts that
    come from random posterior draws, which are seeded per process."""
    double = tmp_path / "two"
    shutil.copytree(run_dir, double)
    proc = subprocess.run(accelerate("tools/evaluate.py", str(double), *EVAL_ARGS),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads(RunDir(d).latest_eval.read_text()) for d in (evaluated, double))
    assert two["processes"] == 2 and two["images"] == one["images"]
    # The PixelVAE's KL is analytic; the iterative VAE's later steps see canvases made from draws.
    exact = "kind: pixel_vae" in RunDir(run_dir).config.read_text()
    assert two["kl"] == pytest.approx(one["kl"], rel=1e-5 if exact else 0.05)
    assert two["active_units"] == one["active_units"]
    assert two["elbo_bpd"] == pytest.approx(one["elbo_bpd"], rel=0.05)
    assert two["iw_bpd"] == pytest.approx(one["iw_bpd"], rel=0.05)


@pytest.mark.slow
def test_sample_on_two_processes_writes_the_whole_grids(run_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        accelerate("tools/sample.py", str(run_dir), "--n", "3", "--chain-steps", "1", "--no-ema", "--out",
                   str(tmp_path)),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cell = RESOLUTION + 2
    assert Image.open(tmp_path / "chain_data.png").size == (2 * cell + 2, 3 * cell + 2)  # 3 chains
    rows = 1 if "kind: pixel_vae" in RunDir(run_dir).config.read_text() else 3
    assert Image.open(tmp_path / "ancestral.png").size == (3 * cell + 2, rows * cell + 2)


def test_a_share_past_a_small_split_draws_no_data_chain(run_dir: Path, shards: Path) -> None:
    """--n above the val split's size under several processes: the last process's rows of the data
    chains are empty, and it draws its noise chains rather than failing on the empty start."""
    val = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["count"]
    grids = draw(load_run(run_dir), range(val, val + 1), val + 1, chain_steps=1, seed=0, rank=1)
    assert grids["chain_data"].shape == (0, 2, 3, RESOLUTION, RESOLUTION)
    assert grids["chain_noise"].shape == (1, 2, 3, RESOLUTION, RESOLUTION)


def test_tools_name_what_is_missing_in_a_bad_run_dir(tmp_path: Path) -> None:
    for tool in ("tools/sample.py", "tools/evaluate.py"):
        proc = subprocess.run(
            [sys.executable, tool, str(tmp_path)],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and "config.yaml" in proc.stderr


@pytest.mark.slow
def test_evaluations_with_other_options_are_kept_beside_the_latest(evaluated: Path, tmp_path: Path) -> None:
    """An EMA evaluation survives a later --no-ema one; eval.json is a copy of the latest."""
    copy = tmp_path / "run"
    shutil.copytree(evaluated, copy)
    proc = run("tools/evaluate.py", str(copy), *EVAL_ARGS, "--no-ema")
    assert f"wrote {copy / 'eval' / 'noema-val-iw3.json'} and {copy / 'eval.json'}" in proc.stderr
    ema, no_ema = (
        json.loads((RunDir(copy).eval / f"{w}-val-iw3.json").read_text()) for w in ("ema", "noema")
    )
    assert ema["ema"] is True and no_ema["ema"] is False
    assert json.loads(RunDir(copy).latest_eval.read_text()) == no_ema


@pytest.fixture(scope="module")
def no_val_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shards, run dir): make_shards' default --val-fraction (0.01) leaves a 200-image source no val
    image; a 1-step iterative VAE trained on them."""
    shards = tmp_path_factory.mktemp("no_val")
    run("tools/make_shards.py", "--source", "demo:200", "--out", str(shards), "--resolution", str(RESOLUTION),
        "--workers", "1", "--no-progress")  # fmt: skip
    assert json.loads((shards / "manifest.json").read_text())["splits"]["val"]["count"] == 0
    run_dir = tmp_path_factory.mktemp("no_val_run")
    run(
        "dist_vae/train.py", "--config", "configs/debug.yaml", f"run_dir={run_dir}", f"data.path={shards}",
        f"data.resolution={RESOLUTION}", "data.batch_size=4", "data.num_workers=0",
        "model.kind=iterative_vae", *TINY["iterative_vae"], "train.steps=1", "train.sample_every=100",
        "train.warmup=0",
    )  # fmt: skip
    return shards, run_dir


def test_sample_starts_data_chains_from_train_images_when_val_is_empty(no_val_run: tuple[Path, Path]) -> None:
    shards, run_dir = no_val_run
    out = run_dir / "grids"
    proc = run("tools/sample.py", str(run_dir), "--n", "2", "--chain-steps", "1", "--out", str(out))
    assert f"{shards}: the val split is empty; data chains start from train images" in proc.stderr
    assert Image.open(out / "chain_data.png").size == (2 * (RESOLUTION + 2) + 2, 2 * (RESOLUTION + 2) + 2)


def test_evaluate_refuses_an_empty_split_in_one_line(no_val_run: tuple[Path, Path], tmp_path: Path) -> None:
    shards, run_dir = no_val_run
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "tools/evaluate.py", str(run_dir), "--iw-samples", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {shards}: the val split is empty; nothing to evaluate (use --split train, or remake the "
        "shards with a larger --val-fraction)"
    )
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
def test_tools_refuse_a_device_torch_cannot_use_in_one_line(no_val_run: tuple[Path, Path]) -> None:
    for tool in ("tools/sample.py", "tools/evaluate.py"):
        proc = subprocess.run([sys.executable, tool, str(no_val_run[1]), "--device", "cuda"],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: --device cuda: no such CUDA device")
