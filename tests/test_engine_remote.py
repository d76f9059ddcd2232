"""Training from shards in an S3-compatible server (moto on 127.0.0.1) through a proxy that fails
about 10% of the requests: two processes end with the weights of the local copy through a kill -9
and a store that becomes unreachable (exit 6 after a checkpoint); a wrong bucket, missing
credentials or a missing manifest end the start in one line and exit 2."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.checkpoint import complete_checkpoints
from dist_vae.data.index import read_manifest
from dist_vae.engine.stops import UNREACHABLE
from dist_vae.errors import ExitCode
from dist_vae.run_layout import RunDir
from tests.engine_util import accelerate_cmd, assert_same, check, checkpoint_contents, env, python_cmd, run
from tests.remote_fixtures import FaultyProxy, s3_copy, s3_env, sampled_sizes
from tests.test_engine_kill import kill_tree, newest_step
from tests.test_engine_resume import SCHEDULE

URL = "s3://train-shards/demo"
STEPS = 30


@pytest.fixture(scope="module")
def proxy(demo_shards: Path) -> Iterator[FaultyProxy]:
    with s3_copy(demo_shards, URL, rate=0.1, seed=5) as p:
        yield p


def scalars(run_dir: Path, tag: str) -> list[float]:
    """Every value of the TensorBoard scalar `tag`, over the event files of all the run's starts."""
    tensorboard = str(RunDir(run_dir).tensorboard)
    events = EventAccumulator(tensorboard, size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return [point.value for point in events.Scalars(tag)]


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 180
    while not done():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after 180 s"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_gloo_processes_on_s3_through_faults_train_the_weights_of_the_local_copy(
    proxy: FaultyProxy, demo_shards: Path, tmp_path: Path
) -> None:
    """2 ranks x 30 steps sharing a node-local cache of three shards (its size sampled throughout):
    killed with SIGKILL past step 10 and resumed; then the store stops answering (every request
    reset): every rank stops at one step, checkpoints it and exits 6; resumed with the store back, the
    run ends with the weights of the same run from the local copy."""
    shards = [s for split in read_manifest(demo_shards)["splits"].values() for s in split["shards"]]
    budget = 3 * max(s["bytes"] for s in shards)
    cache = tmp_path / "cache"
    remote = [f"data.cache_dir={cache}", f"data.cache_bytes={budget}", "data.remote_retries=3",
              "data.remote_timeout_s=10"]  # fmt: skip
    overrides = [f"train.steps={STEPS}", "train.sample_every=100", *SCHEDULE]  # sample grids: only time
    check(run(accelerate_cmd("cpu_debug.yaml", tmp_path / "local", demo_shards, *overrides), timeout=300))
    s3 = tmp_path / "s3"
    cmd = accelerate_cmd("cpu_debug.yaml", s3, URL, *overrides, *remote)  # type: ignore[arg-type]
    s3_run = env(**s3_env(proxy.url))

    def start(log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as err:
            return subprocess.Popen(cmd, env=s3_run, stdout=subprocess.DEVNULL, stderr=err)

    with sampled_sizes(cache) as sizes:
        killed = start("killed.log")
        wait_until(killed, lambda: newest_step(s3) >= 10, "checkpoint of step 10")
        kill_tree(killed)
        resumed_at = newest_step(s3)
        assert resumed_at < STEPS

        cut_off = start("cut_off.log")  # resumes, checkpoints once more, then loses the store
        wait_until(cut_off, lambda: newest_step(s3) > resumed_at, "checkpoint after the resume")
        proxy.down = True
        try:
            cut_off.wait(timeout=180)
        finally:
            proxy.down = False
        said = (tmp_path / "cut_off.log").read_text()
        marker = RunDir(s3).marker("requeue").read_text().splitlines()
        stopped = int(marker[0].removeprefix("step "))
        assert marker[1] == f"reason {UNREACHABLE}", marker
        assert resumed_at < stopped < STEPS and newest_step(s3) == stopped, (resumed_at, stopped)
        assert f"stopped at step {stopped} (checkpoint " in said, said[-3000:]
        assert "object store unreachable after 3 retries" in said, said[-3000:]
        # torchrun names the first rank's own exit code (it may stop the other with SIGTERM once that
        # one has left: both are past the checkpoint and the marker then), and exits 1 itself.
        assert cut_off.returncode != 0 and f"exitcode  : {int(ExitCode.STORE_UNREACHABLE)}" in said
        assert proxy.refused > 0

        check(run(cmd, timeout=300, **s3_env(proxy.url)))  # type: ignore[arg-type]
    local, ended = complete_checkpoints(tmp_path / "local")[-1], complete_checkpoints(s3)[-1]
    assert local[0] == ended[0] == STEPS
    assert_same(checkpoint_contents(local[1]), checkpoint_contents(ended[1]))
    assert sum(proxy.faults.values()) > 0, proxy.faults
    assert max(scalars(s3, "data/remote_retries")) > 0
    assert all(d > 0 for d in scalars(s3, "data/remote_bytes"))  # each start counts afresh
    assert 0 < max(sizes) <= budget and len(sizes) > 100, (max(sizes), budget, len(sizes))
    assert "testing" not in (s3 / "config.yaml").read_text()  # no credential reaches the run directory


def test_a_store_down_at_start_is_exit_6_and_the_requeue_marker(proxy: FaultyProxy, tmp_path: Path) -> None:
    down = FaultyProxy(proxy.upstream)
    down.down = True
    overrides = ("train.steps=2", "data.remote_retries=2", "data.remote_timeout_s=2")
    proc = run(python_cmd(tmp_path / "run", URL, *overrides), timeout=120, **s3_env(down.url))  # type: ignore[arg-type]
    down.close()
    assert proc.returncode == ExitCode.STORE_UNREACHABLE, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {URL}/manifest.json: object store unreachable after 2 retries"), last
    assert "nothing trained (newest checkpoint: step 0); exit 6" in last, last
    marker = RunDir(tmp_path / "run").marker("requeue").read_text()
    assert marker.startswith(f"step 0\nreason {UNREACHABLE}\n"), marker
    assert not complete_checkpoints(tmp_path / "run")


@pytest.mark.parametrize(
    ("url", "drop", "says"),
    [
        ("s3://no-such-bucket/demo", (), "s3://no-such-bucket/demo/manifest.json: no such bucket"),
        ("s3://train-shards/nothing", (), "s3://train-shards/nothing/manifest.json is missing"),
        (URL, ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), f"{URL}/manifest.json: no credentials"),
    ],
    ids=["wrong-bucket", "missing-manifest", "no-credentials"],
)
def test_a_permanent_error_is_one_line_and_exit_2(
    proxy: FaultyProxy,
    tmp_path: Path,
    url: str,
    drop: tuple[str, ...],
    says: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    env = {k: v for k, v in s3_env(proxy.url).items() if k not in drop}
    proc = run(python_cmd(tmp_path / "run", url, "train.steps=2"), timeout=120, **env)  # type: ignore[arg-type]
    assert proc.returncode == ExitCode.REFUSED, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert says in last, last
    assert not list((tmp_path / "run").glob("checkpoint*"))
