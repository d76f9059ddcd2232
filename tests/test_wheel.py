"""The wheel as a user gets it: built from a copy of the sources, installed into a fresh virtual
environment outside the repository (its dependencies seen from this environment's site-packages, so
nothing is downloaded), then `dist-vae shards`, `train` of the shipped debug config by name, `sample`,
`export` and `dist_vae.load`, run from an empty folder with no PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "configs", "dist_vae"]
TINY = ["model.latent_dim=4", "model.nr_resnet=1", "model.nr_filters=8", "model.nr_mix=2", "model.n_stages=2",
        "model.encoder_channels=8"]  # fmt: skip


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd[:3]}: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy(ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(out), str(src)]  # fmt: skip
    run(cmd, src, env)
    (found,) = out.glob("dist_vae-*.whl")
    return found


def test_the_wheel_carries_the_package_the_configs_and_the_command(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "dist_vae/configs/debug.yaml" in names and "dist_vae/configs/accelerate/ddp.yaml" in names
    assert "dist_vae/commands/sample.py" in names and not any(
        n.startswith(("tests/", "tools/")) for n in names
    )
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dist-vae = dist_vae.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_into_a_fresh_venv_the_command_and_the_api_work(wheel: Path, tmp_path: Path) -> None:
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
        tmp_path,
        {},
    )
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, {})
    # This environment's packages (torch, accelerate, ...) as plain paths: its .pth files, among them
    # the editable install of a checkout, are not run.
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "-q",
        "--no-deps",
        "--no-index",
    ]
    run([*install, str(wheel)], tmp_path, env)
    command = str(venv / "bin" / "dist-vae")
    run([command, "shards", "--source", "demo:20", "--out", "shards", "--resolution", "8", "--val-fraction",
         "0.3", "--workers", "1", "--no-progress"], work, env)  # fmt: skip
    run([command, "train", "--config", "debug", "run_dir=runs/debug", "data.path=shards", "data.resolution=8",
         "data.batch_size=4", "data.num_workers=0", "data.shuffle_group=2", *TINY, "train.steps=2",
         "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=1", "train.sample_every=2",
         "train.sample_count=2", "train.warmup=1"], work, env)  # fmt: skip
    run([command, "sample", "runs/debug", "--n", "2", "--chain-steps", "1"], work, env)
    assert (work / "runs/debug/samples/step-00000002/ancestral.png").is_file()
    run([command, "export", "runs/debug", "export"], work, env)
    check = (
        "import dist_vae, numpy as np\n"
        f"assert dist_vae.__file__.startswith({str(venv)!r}), dist_vae.__file__\n"
        "a, b = dist_vae.load('export'), dist_vae.load('runs/debug')\n"
        "assert np.array_equal(a.sample(2, seed=1), b.sample(2, seed=1))\n"
        "print(a)\n"
    )
    assert "PretrainedVAE(pixel_vae, 8 px, step 2" in run([str(python), "-c", check], work, env).stdout
