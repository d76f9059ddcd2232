"""dist_vae.load and `dist-vae export` on a run that `dist-vae shards` and `dist-vae train` made: the
README's example as written, samples equal to `dist-vae sample`'s grid, an export that loads to the
same samples, and one clear error for each bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dist_vae
from dist_vae.cli import main as dist_vae_command
from dist_vae.errors import DistVaeError, ExitCode
from dist_vae.export import model_card
from dist_vae.files import image_grid
from dist_vae.run_dir import load_run

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
RESOLUTION = 8
TINY = ["model.latent_dim=4", "model.nr_resnet=1", "model.nr_filters=8", "model.nr_mix=2", "model.n_stages=2",
        "model.encoder_channels=8"]  # fmt: skip


def cli(*args: str, cwd: Path = ROOT, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dist_vae.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == code, (
        f"dist-vae {args[0]}: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tmp/runs/debug: 4 steps of the shipped debug config (named, not a path) shrunk to 8 px."""
    work = tmp_path_factory.mktemp("api")
    shards = work / "shards"
    cli("shards", "--source", "demo:30", "--out", str(shards), "--resolution", str(RESOLUTION),
        "--val-fraction", "0.3", "--workers", "1", "--no-progress")  # fmt: skip
    cli("train", "--config", "debug", f"run_dir={work / 'runs' / 'debug'}", f"data.path={shards}",
        f"data.resolution={RESOLUTION}", "data.batch_size=4", "data.num_workers=0", "data.shuffle_group=2",
        *TINY, "train.steps=4", "train.checkpoint_every=4", "train.eval_every=4", "train.eval_batches=1",
        "train.sample_every=4", "train.sample_count=4", "train.warmup=1", "train.ema_decay=0.9")  # fmt: skip
    return work


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "dist_vae.load(" in b]
    assert len(found) == 1, "the README holds one Python example of dist_vae.load"
    assert len(found[0].strip().splitlines()) <= 12
    return found[0]


def test_the_readme_example_runs_as_written_and_samples_as_dist_vae_sample_does(work: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", readme_example()], cwd=work, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"\d+\.\d{3} bits/dim, codes \(1, 4\), 5 chain steps\n", proc.stdout), proc.stdout
    # The sample the example saved is sample 0 of `dist-vae sample --n 8 --seed 0`'s grid.
    out = work / "grids"
    assert dist_vae_command(["sample", str(work / "runs" / "debug"), "--n", "8", "--chain-steps", "1",
                             "--out", str(out)]) == 0  # fmt: skip
    tool_grid = np.asarray(Image.open(out / "ancestral.png"))
    vae = dist_vae.load(work / "runs" / "debug")
    assert np.array_equal(tool_grid, image_grid([vae.sample(8, seed=0, output="tensor")]))
    saved = np.asarray(Image.open(work / "sample.png"))
    assert np.array_equal(saved, tool_grid[2 : 2 + RESOLUTION, 2 : 2 + RESOLUTION])


def test_inputs_of_every_kind_give_the_same_codes_and_outputs_come_in_every_form(work: Path) -> None:
    vae = dist_vae.load(work / "runs" / "debug")
    arrays = vae.sample(3, seed=5)
    assert arrays.dtype == np.uint8 and arrays.shape == (3, RESOLUTION, RESOLUTION, 3)
    pils = [Image.fromarray(a) for a in arrays]
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
    codes = [vae.encode(x)[0] for x in (arrays, pils, tensor, list(arrays))]
    for other in codes[1:]:
        torch.testing.assert_close(other, codes[0])
    mean, logvar = vae.encode(arrays)
    assert mean.shape == (3, 4) and logvar is not None and logvar.shape == (3, 4)
    # A larger, non-square picture is resized like the shards: shorter side, then a centre crop.
    big = Image.fromarray(np.kron(arrays[0], np.ones((4, 6, 1), np.uint8)))  # 32 x 48
    assert vae.images(big).shape == (1, 3, RESOLUTION, RESOLUTION)
    assert isinstance(vae.reconstruct(pils, output="pil")[0], Image.Image)
    assert vae.reconstruct(tensor, output="tensor").shape == (3, 3, RESOLUTION, RESOLUTION)
    bpd = vae.bits_per_dim(arrays)
    assert bpd.shape == (3,) and np.isfinite(bpd).all() and (bpd > 0).all()
    chain = vae.chain(arrays[:2], steps=2)
    assert len(chain) == 3 and np.array_equal(chain[0], arrays[:2])


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (np.zeros((8, 8, 4), np.uint8), "3 channels last"),
        (np.zeros((8, 8), np.uint8), "3 channels last"),
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        ([], "no images"),
        (torch.zeros(1, 8, 8), "3 channels first"),
        (torch.full((3, 8, 8), 2.0), "in [-1, 1]"),
        ("picture.png", "cannot read str"),
    ],
)
def test_a_bad_input_gives_one_error_naming_what_was_expected(work: Path, bad: object, expected: str) -> None:
    vae = dist_vae.load(work / "runs" / "debug")
    with pytest.raises(dist_vae.pretrained.ImageInputError, match=re.escape(expected)):
        vae.encode(bad)


def test_a_path_that_is_no_run_is_refused_in_one_line(work: Path, tmp_path: Path) -> None:
    with pytest.raises(DistVaeError, match="neither a run directory"):
        dist_vae.load(tmp_path)
    proc = cli("export", str(tmp_path), str(tmp_path / "out"), code=ExitCode.REFUSED)
    assert proc.stderr.count("\n") == 1 and "neither a run directory" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "config.yaml" in proc.stderr


def test_an_export_loads_to_the_same_samples_and_bf16_halves_it(work: Path) -> None:
    run = work / "runs" / "debug"
    cli(
        "evaluate",
        str(run),
        "--iw-samples",
        "2",
        "--fuzz-samples",
        "2",
        "--chain-steps",
        "1",
        "--no-progress",
    )
    out, half = work / "export", work / "export-bf16"
    cli("export", str(run), str(out))
    cli("export", str(run), str(half), "--dtype", "bf16")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "samples.png",
    ]
    config = json.loads((out / "config.json").read_text())
    assert (
        set(config) == {"format", "resolution", "model", "weights"} and config["model"]["kind"] == "pixel_vae"
    )
    assert config["weights"] == {"ema": True, "dtype": "fp32", "step": 4}
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dist-vae\n") and "Steps: 4 of 4" in card
    assert "Bits/dim (val, step 4): ELBO " in card and "![samples](samples.png)" in card
    size, half_size = (out / "model.safetensors").stat().st_size, (half / "model.safetensors").stat().st_size
    assert 0.45 < half_size / size < 0.6  # the JSON header is a fixed cost
    from_run, from_export = dist_vae.load(run), dist_vae.load(out)
    assert np.array_equal(from_run.sample(4, seed=3), from_export.sample(4, seed=3))
    assert from_export.step == 4 and from_export.ema
    assert dist_vae.load(half).sample(2, seed=3).shape == (2, RESOLUTION, RESOLUTION, 3)


def test_the_model_card_names_fid_with_its_n(work: Path) -> None:
    evaluation = {"split": "val", "step": 4, "elbo_bpd": 5.25, "iw_bpd": 5.1,
                  "sample_quality": {"n": 100, "ways": {"prior": {"fid": 123.456, "n": 100}}}}  # fmt: skip
    card = model_card(load_run(work / "runs" / "debug"), evaluation, grid=False, dtype="bf16")
    assert "- FID (prior, N=100): 123.46" in card and "importance-weighted 5.1000" in card
    assert "bf16" in card and "samples.png" not in card
