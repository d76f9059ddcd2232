"""DataLoader workers of a real process iterating a ShardStream, under real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_vae.data.shards import ShardSettings, build_shards
from tests.data_fixtures import id_images

ROOT = Path(__file__).resolve().parents[1]

# Iterates with 2 workers; on SIGTERM it notes it and keeps going for 5 batches, then exits 0.
CHILD = """
import signal, sys
from dist_vae.config import DataConfig
from dist_vae.data.stream import ShardStream

terms = []
signal.signal(signal.SIGTERM, lambda *_: terms.append(1))
cfg = DataConfig(path=sys.argv[1], resolution=8, num_workers=2, shuffle_group=2)
after = 0
for i, batch in enumerate(ShardStream(cfg, batch_size=2)):
    if i == 2:
        print("ready", flush=True)
    if terms:
        after += 1
        if after == 5:
            print(f"handled SIGTERM, {after} batches after it", flush=True)
            sys.exit(0)
"""


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    id_images(root / "images", 20)
    settings = ShardSettings(
        source=f"folder:{root / 'images'}", resolution=8, format="png", shard_size=5, val_fraction=0.0
    )
    build_shards(settings, root / "shards", progress=False)
    return root / "shards"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie whose parent has not reaped it yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start(shard_dir: Path) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(shard_dir)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    return proc, workers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_die_within_a_second_of_a_kill_9(shard_dir: Path) -> None:
    proc, workers = start(shard_dir)
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    while any(alive(w) for w in workers) and time.monotonic() - killed < 1.0:
        time.sleep(0.01)
    assert not any(alive(w) for w in workers), f"workers {workers} outlived a kill -9 of their parent by 1 s"


def test_sigterm_to_the_process_group_leaves_the_decision_to_the_main_process(shard_dir: Path) -> None:
    proc, _ = start(shard_dir)  # a worker killed by SIGTERM would make the DataLoader raise
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "handled SIGTERM, 5 batches after it" in out


# Leaves an iteration with 2 workers open (a module-level iterator) when the interpreter exits.
OPEN_AT_EXIT = """
import sys
from dist_vae.config import DataConfig
from dist_vae.data.stream import ShardStream

batches = iter(ShardStream(DataConfig(path=sys.argv[1], resolution=8, num_workers=2), batch_size=2))
first = next(batches)
print("got", tuple(first.shape), first.dtype, -1 <= float(first.min()) <= float(first.max()) <= 1, flush=True)
"""


def test_an_iteration_left_open_at_exit_does_not_hang_the_exit(shard_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", OPEN_AT_EXIT, str(shard_dir)], env=env, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("exit waited 60 s for the workers of an open iteration") from None
    assert proc.returncode == 0, out
    assert out.strip() == "got (2, 3, 8, 8) torch.float32 True"
