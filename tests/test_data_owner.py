"""One make_shards per output (a lease file), and Ctrl-C: real processes, real signals.

The lease itself (dist_vae/lease.py) is checked in-process: refusal, take-over of a holder whose pid
is gone or whose heartbeat is old, the heartbeat, and one winner among racing takers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_vae.lease import Lease, LeaseHeld
from tests.data_fixtures import snapshot

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", "--source",
            f"folder:{src}", "--out", str(out), "--resolution", "8", "--shard-size", "1",
            "--val-fraction", "0", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 noise images: long enough to build (one shard each, each fsync'd) to catch it midway."""
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(5)
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    return src


@pytest.fixture(scope="module")
def whole(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted build: what every interrupted one must end as."""
    out = tmp_path_factory.mktemp("whole") / "out"
    subprocess.run(cli(folder, out), env=ENV, check=True, capture_output=True, timeout=300)
    return shards_of(out)


def shards_of(out: Path) -> dict[str, bytes]:
    return {k: v[0] for k, v in snapshot(out).items() if not k.startswith(".cache")}


def wait_for_progress(out: Path, shards: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while len(list((out / ".progress").glob("*.tar.json"))) < shards:
        assert proc.poll() is None and time.monotonic() < deadline, "make_shards ended before it was caught"
        time.sleep(0.005)


def test_a_second_make_shards_on_one_output_is_refused_naming_the_holder(
    folder: Path, whole, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(
        cli(folder, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    second = subprocess.Popen(
        cli(folder, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    results = [(p, *p.communicate(timeout=300)) for p in (first, second)]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    (winner, _, _), (_, _, err) = sorted(results, key=lambda r: r[0].returncode)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in (f"in use by make_shards pid {winner.pid} on {socket.gethostname()}", str(out), "wait"):
        assert fragment in lines[0], lines[0]
    assert shards_of(out) == whole  # the refused one changed nothing
    assert not (out / ".lease.json").exists()


def test_a_holder_killed_with_9_is_taken_over_in_one_line(folder: Path, whole, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(folder, out), env=ENV)
    wait_for_progress(out, 3, proc)
    proc.kill()
    proc.wait()
    assert json.loads((out / ".lease.json").read_text())["pid"] == proc.pid
    again = subprocess.run(cli(folder, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and f"taking over the output from make_shards pid {proc.pid}" in lines[0], lines
    assert shards_of(out) == whole and not list(out.rglob("*.tmp-*"))


def test_a_make_shards_whose_lease_was_taken_stops_before_writing_more(folder: Path, tmp_path: Path) -> None:
    """It looked gone (say, frozen past the timeout) and another took over: it must not go on too."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli(folder, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_progress(out, 2, proc)
    taker = {**json.loads((out / ".lease.json").read_text()), "host": "node-elsewhere", "token": "taker"}
    (out / ".lease.json").write_text(json.dumps(taker))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another make_shards took this output over" in lines[0], err
    assert json.loads((out / ".lease.json").read_text())["token"] == "taker"  # the taker's, left alone
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_in_one_line_with_130_and_the_same_command_finishes(
    folder: Path, whole, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "out"
    cmd = cli(folder, out, "--workers", str(workers))
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_progress(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted" in lines[0] and "run the same command to finish" in lines[0], lines[0]
    kept = len(list((out / ".progress").glob("*.tar.json")))
    assert kept >= 3 and f"{kept} finished shards kept" in lines[0]
    assert not (out / ".lease.json").exists() and not (out / "manifest.json").exists()
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert shards_of(out) == whole


def test_lease_refuses_a_live_holder_and_takes_over_a_gone_one(tmp_path: Path) -> None:
    path = tmp_path / "run" / ".lease.json"
    with Lease(path, owner="trainer") as held:
        with pytest.raises(
            LeaseHeld, match=rf"in use by trainer pid {os.getpid()} on {socket.gethostname()}"
        ):
            Lease(path, owner="trainer").acquire()
        body = json.loads(path.read_text())
        assert body["token"] == held.token and {"host", "pid", "start", "heartbeat", "slurm_job"} <= set(body)
    assert not path.exists()

    def plant(**fields: object) -> None:
        now = time.time()
        base = {"owner": "trainer", "host": socket.gethostname(), "pid": os.getpid(), "start": now,
                "heartbeat": now, "token": "other"}  # fmt: skip
        path.write_text(json.dumps({**base, **fields}))

    plant(host="node-elsewhere", pid=1)  # another node's holder with a fresh heartbeat: alive
    with pytest.raises(LeaseHeld, match="node-elsewhere"):
        Lease(path, owner="trainer", timeout=30).acquire()
    plant(host="node-elsewhere", pid=1, heartbeat=time.time() - 31)  # silent for longer than the timeout
    lease = Lease(path, owner="trainer", timeout=30).acquire()
    assert (
        lease.taken_over and "node-elsewhere" in lease.taken_over and "heartbeat 31 s ago" in lease.taken_over
    )
    lease.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(pid=dead.pid)  # same host, fresh heartbeat, but the process is gone
    lease = Lease(path, owner="trainer").acquire()
    assert lease.taken_over and f"pid {dead.pid}" in lease.taken_over
    lease.release()


def test_lease_sweeps_private_files_of_dead_processes_on_this_host(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    left = tmp_path / f".lease.json.{host}-{dead.pid}-tokenxyzabcd"
    other_node = tmp_path / ".lease.json.node-elsewhere-1-tokenxyzabcd"
    for f in (left, other_node):
        f.write_text("{}")
    Lease(tmp_path / ".lease.json", owner="trainer").acquire().release()
    assert not left.exists() and other_node.exists()


def test_lease_heartbeat_is_renewed_and_a_lost_lease_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / ".lease.json"
    lease = Lease(path, owner="trainer", interval=0.05).acquire()
    first = json.loads(path.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(path.read_text())["heartbeat"] > first and not lease.lost
    path.write_text(json.dumps({**json.loads(path.read_text()), "token": "someone else"}))
    time.sleep(0.3)
    assert lease.lost
    lease.release()
    assert json.loads(path.read_text())["token"] == "someone else"  # not ours to remove


@pytest.mark.parametrize("round_", range(10))
def test_one_of_many_racing_takers_wins(tmp_path: Path, round_: int) -> None:
    path = tmp_path / ".lease.json"
    path.write_text(json.dumps({"host": "gone-node", "pid": 1, "heartbeat": 0, "token": "stale"}))
    barrier, won, refused = threading.Barrier(8), [], []

    def take() -> None:
        lease = Lease(path, owner="trainer")
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert json.loads(path.read_text())["token"] == won[0].token
    won[0].release()
    assert list(tmp_path.iterdir()) == []  # no lock, private or stale file left behind


def test_lease_is_a_stdlib_only_leaf() -> None:
    """The trainer's run directories will use it too: it may import nothing of the project."""
    import ast

    tree = ast.parse((ROOT / "dist_vae" / "lease.py").read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in modules), modules
