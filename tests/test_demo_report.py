"""tools/demo_report.py, the end of `make demo`, on a tiny run over scene shards (FID is off here:
tests/test_fid.py covers the function it calls)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dist_vae.config import load_config
from dist_vae.run_layout import RunDir
from tests.test_tools_sampling import ENV, ROOT, run

SIDE, COLS, ROWS, SCALE, PROBE_N = 16, 4, 2, 2, 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards, path = tmp_path_factory.mktemp("scenes"), tmp_path_factory.mktemp("run")
    run("tools/make_shards.py", "--source", "scenes:96", "--out", str(shards), "--resolution", str(SIDE),
        "--val-fraction", "0.25", "--no-progress")  # fmt: skip
    run("tools/probe.py", "train", str(shards), "--epochs", "1", "--width", "4", "--threads", "1")
    run(
        "dist_vae/train.py", "--config", "configs/demo_scenes.yaml", f"run_dir={path}", f"data.path={shards}",
        f"data.resolution={SIDE}", "data.batch_size=4", "data.num_workers=0", "model.channels=2",
        "train.steps=2", "train.checkpoint_every=2", "train.eval_every=2", "train.sample_every=2",
        "train.sample_count=2", "train.warmup=1",
    )  # fmt: skip
    return path


def test_report_prints_the_grid_and_the_probe_scores_and_writes_them(run_dir: Path) -> None:
    args = [
        "--fid",
        "0",
        "--probe-n",
        str(PROBE_N),
        "--cols",
        str(COLS),
        "--rows",
        str(ROWS),
        "--scale",
        str(SCALE),
    ]
    lines = run("tools/demo_report.py", str(run_dir), *args).stdout.splitlines()
    grid = RunDir(run_dir).samples / "demo_grid.png"
    assert lines[0].startswith(f"grid: {grid} (top row: val scenes; below: samples of step 2, EMA")
    assert lines[1].startswith("probe Fréchet distance") and lines[2].startswith("on the manifold")
    assert len(lines) == 3  # no FID line when --fid 0
    result = json.loads((run_dir / "demo_report.json").read_text())
    assert result["step"] == 2 and result["probe_n"] == PROBE_N and "fid" not in result
    probe = result["probe"]
    assert probe["probe_fd"] >= 0 and probe["probe_fd_train_vs_val"] >= 0
    assert 0 < probe["fake_confidence"] <= 1 and 0 <= probe["real_render_error"] <= 1
    rows = 1 + ROWS  # one row of val scenes, then the samples
    with Image.open(grid) as image:
        assert image.size == (SCALE * (COLS * (SIDE + 2) + 2), SCALE * (rows * (SIDE + 2) + 2))


def test_a_run_whose_shards_have_no_probe_is_refused_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    config = RunDir(run_dir).config.read_text()
    shards = Path(load_config(RunDir(run_dir).config).data.path)
    shutil.copytree(shards, tmp_path / "shards", ignore=shutil.ignore_patterns("probe"))
    shutil.copytree(run_dir, tmp_path / "run")
    RunDir(tmp_path / "run").config.write_text(config.replace(str(shards), str(tmp_path / "shards")))
    proc = subprocess.run([sys.executable, "tools/demo_report.py", str(tmp_path / "run"), "--fid", "0"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "tools/probe.py train" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
