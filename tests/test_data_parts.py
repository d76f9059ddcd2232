"""One shard output built in parts (`make_shards --part I/N`, then `--finish N`): byte-identical to one
process's build, skipped images and notes merged from every part, refusals in one line, the leases of
parts; and cluster/make_shards.sh as a Slurm array job under a real local Slurm."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_vae.commands.make_shards import main
from dist_vae.lease import Lease
from tests.slurm_jobs import FINAL_STATES
from tests.slurm_local import SLURM_PACKAGES, LocalSlurm, ensure_commands

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["--shard-size", "3", "--val-fraction", "0.25", "--format", "png"]


def args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--source", f"folder:{folder}", "--out", str(out), "--resolution", "8", "--no-progress",
            *OPTIONS, *extra]  # fmt: skip


def files(out: Path) -> dict[str, str]:
    """sha256 of every file of the output (shards, indexes, manifest)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in out.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """21 noise images, two files that are no image, one too small, two animated GIFs (notes)."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(3)
    for i in range(21):
        h, w = rng.integers(10, 20, size=2)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    for name in ("bad-a.png", "bad-b.png"):
        (src / name).write_bytes(b"not an image")
    Image.new("RGB", (1, 1)).save(src / "tiny.png")
    for name in ("anim-a.gif", "anim-b.gif"):
        frames = [Image.new("RGB", (12, 12), c) for c in ((250, 0, 0), (0, 250, 0))]
        frames[0].save(src / name, save_all=True, append_images=frames[1:], duration=100)
    return src


@pytest.fixture(scope="module")
def whole(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same output built by one process: what every build in parts must equal, file for file."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(args(folder, out)) == 0
    return out


def test_three_parts_and_the_finish_equal_one_process(
    folder: Path, whole: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".train-000000.tar.tmp-elsewhere-1-x"  # part 0's shard, left by a writer that died
    stale.write_bytes(b"partial")
    for part in ("2/3", "1/3"):
        assert main(args(folder, out, "--part", part)) == 0
    assert stale.exists()  # another part's temporary: left alone (its writer may be alive)
    capsys.readouterr()
    assert main(args(folder, out, "--finish", "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "part(s) 0/3 not finished" in err and "part-0-of-3.json" in err, err
    assert not (out / "manifest.json").exists()
    assert main(args(folder, out, "--part", "0/3")) == 0
    assert not stale.exists()
    # A part killed before its record: the rerun redoes only what is missing.
    record_file = out / ".progress" / "part-1-of-3.json"
    victim = json.loads(record_file.read_text())["records"][-1]["name"]
    (out / victim).unlink()
    record_file.unlink()
    assert main(args(folder, out, "--part", "1/3")) == 0
    records = [json.loads((out / f".progress/part-{i}-of-3.json").read_text()) for i in range(3)]
    with_lists = [i for i, r in enumerate(records) if any(s["skipped"] or s["notes"] for s in r["records"])]
    assert len(with_lists) >= 2, with_lists  # skipped images and notes come from several parts
    assert main(args(folder, out, "--finish", "3")) == 0
    assert files(out) == files(whole)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["skipped"]["count"], manifest["notes"]["count"]) == (3, 2)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no record, lease or temporary
    # Finished: the finish again and a late part change nothing.
    assert main(args(folder, out, "--finish", "3")) == 0
    assert main(args(folder, out, "--part", "1/3")) == 0
    assert "already finished" in capsys.readouterr().out
    assert files(out) == files(whole)


@pytest.mark.parametrize(
    "bad", [("--part", "3/3"), ("--part", "0/0"), ("--part", "x/2"), ("--part", "1/2/3"), ("--finish", "0")]
)
def test_bad_part_values_are_refused_in_one_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: tuple[str, str]
) -> None:
    assert main(args(folder, tmp_path / "out", *bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"make_shards.py: error: {bad[0]} {bad[1]}: expected"), err
    assert not (tmp_path / "out").exists()


def test_parts_do_not_refuse_each_other_but_a_second_copy_of_one_part_is_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with Lease(out / ".lease-part-1-of-3.json", owner="make_shards --part 1/3"):  # part 1 is running
        assert main(args(folder, out, "--part", "1/3")) == 2
        assert "a second make_shards --part 1/3 on one --out is refused" in capsys.readouterr().err
        assert main(args(folder, out, "--part", "0/3")) == 0
        for whole_or_finish in ((), ("--finish", "3")):
            assert main(args(folder, out, *whole_or_finish)) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "do not run together" in err and "part-1-of-3" in err, err
    with Lease(out / ".lease.json", owner="make_shards"):  # a whole build or the finish is running
        assert main(args(folder, out, "--part", "2/3")) == 2
        assert "do not run together" in capsys.readouterr().err


def test_the_slurm_array_job_builds_what_one_process_builds(tmp_path: Path) -> None:
    """The demo source, which each part makes under OUT/.cache at the same time as the others."""
    reason = ensure_commands(SLURM_PACKAGES)
    if reason:
        pytest.skip(reason)
    out, logs, whole = tmp_path / "out", tmp_path / "logs", tmp_path / "whole"
    demo = ["--resolution", "32", "--shard-size", "2", "--val-fraction", "0.25"]
    assert main(["--source", "demo:16", "--out", str(whole), "--no-progress", *demo]) == 0
    with LocalSlurm(nodes=2) as slurm:
        env = {k: v for k, v in slurm.env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
        env.update(SOURCE="demo:16", OUT=str(out), RESOLUTION="32", PARTS="3", LOG_DIR=str(logs),
                   SHARD_ARGS=" ".join(demo[2:]), PYTHON=sys.executable, OMP_NUM_THREADS="1")  # fmt: skip
        done = subprocess.run(
            [str(REPO / "cluster/make_shards.sh"), "--cpus-per-task=1"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        finish = re.search(r"array job \d+ and the finish as job (\d+)", done.stdout).group(1)
        info = slurm.wait_job(finish, lambda i: i["JobState"] in FINAL_STATES, 180)
        log = "\n".join(p.read_text() for p in sorted(logs.iterdir()))
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log}"
    for i in range(3):
        assert f"part {i}/3 of {out}" in log and f"{out}: part {i}/3:" in log, log
    assert f"finishing {out}" in log and f"{out}: train " in log, log
    assert files(out) == files(whole)
