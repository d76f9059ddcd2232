"""Training from shards in an S3-compatible server (moto on 127.0.0.1) through a proxy that fails
about 10% of the requests: the same weights as from the local copy, resumed or not; a wrong bucket,
missing credentials or a missing manifest end the start in one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.errors import ExitCode
from dist_vae.run_layout import RunDir
from tests.engine_util import accelerate_cmd, assert_same, check, checkpoint_contents, python_cmd, run
from tests.remote_fixtures import FaultyProxy, create_bucket, moto_server, s3_env, upload_dir
from tests.test_engine_resume import SCHEDULE, complete_checkpoints

URL = "s3://train-shards/demo"
STEPS = 8


@pytest.fixture(scope="module")
def proxy(demo_shards: Path) -> object:
    with moto_server() as port:
        create_bucket(port, "train-shards")
        upload_dir(port, demo_shards, URL)
        p = FaultyProxy(port, rate=0.1, seed=5)
        yield p
        p.close()


def final(run_dir: Path) -> dict:
    step, path = complete_checkpoints(run_dir)[-1]
    assert step == STEPS
    return checkpoint_contents(path)


@pytest.mark.slow
def test_s3_through_faults_trains_the_weights_of_the_local_copy_and_resumes_them(
    proxy: FaultyProxy, demo_shards: Path, tmp_path: Path
) -> None:
    env = s3_env(proxy.url)
    cache = [f"data.cache_dir={tmp_path / 'cache'}", "data.remote_retries=6", "data.remote_timeout_s=10"]
    check(run(python_cmd(tmp_path / "local", demo_shards, f"train.steps={STEPS}", *SCHEDULE)))
    s3 = tmp_path / "s3"  # half the run, then resumed: the same weights as the local run in one go
    check(run(python_cmd(s3, URL, "train.steps=4", *SCHEDULE, *cache), **env))  # type: ignore[arg-type]
    check(run(python_cmd(s3, URL, f"train.steps={STEPS}", *SCHEDULE, *cache, "resume=auto"), **env))  # type: ignore[arg-type]
    assert_same(final(tmp_path / "local"), final(s3))
    assert sum(proxy.faults.values()) > 0, proxy.faults
    events = EventAccumulator(str(RunDir(tmp_path / "s3").tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    downloaded = [p.value for p in events.Scalars("data/remote_bytes")]
    assert all(d > 0 for d in downloaded), downloaded  # counted from each start (a resume counts afresh)
    assert "data/remote_retries" in events.Tags()["scalars"]
    config = (tmp_path / "s3" / "config.yaml").read_text()
    assert "testing" not in config  # no credential reaches the run directory


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


@pytest.mark.slow
def test_two_gloo_processes_on_s3_through_faults_train_the_weights_of_the_local_copy(
    proxy: FaultyProxy, demo_shards: Path, tmp_path: Path
) -> None:
    """Both ranks share one node-local cache: each shard is downloaded once however many read it."""
    env = s3_env(proxy.url)
    cache = [f"data.cache_dir={tmp_path / 'cache'}", "data.remote_retries=6", "data.remote_timeout_s=10"]
    steps = f"train.steps={STEPS}"
    check(run(accelerate_cmd("cpu_debug.yaml", tmp_path / "local", demo_shards, steps, *SCHEDULE)))
    check(run(accelerate_cmd("cpu_debug.yaml", tmp_path / "s3", URL, steps, *SCHEDULE, *cache), **env))  # type: ignore[arg-type]
    assert_same(final(tmp_path / "local"), final(tmp_path / "s3"))
