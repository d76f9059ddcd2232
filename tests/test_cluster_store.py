"""cluster/launch.sh under tests/slurm_local.py's Slurm with the real trainer reading s3:// from a moto
server that refuses every connection: the trainer exits 6 and leaves the requeue marker with reason
`store-unreachable`; the batch shell waits STORE_RETRY_DELAY and requeues the job, not counting it as a
crash. (That a requeued job resumes is test_cluster_slurm.py's.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_vae.engine.stops import UNREACHABLE
from dist_vae.run_layout import RunDir
from tests.remote_fixtures import s3_copy, s3_env
from tests.slurm_jobs import FINAL_STATES, QUIET, assert_in_order, job_env, job_log, submit_self
from tests.slurm_local import LocalSlurm

URL = "s3://slurm-shards/demo"


@pytest.mark.slow
def test_an_unreachable_store_is_requeued_after_the_delay(
    slurm: LocalSlurm, demo_shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    remote = f"data.remote_retries=1 data.remote_timeout_s=5 data.cache_dir={tmp_path / 'cache'}"
    with s3_copy(demo_shards, URL) as proxy:
        proxy.down = True
        env = job_env(slurm.env, demo_shards, run_dir, f"{remote} {QUIET}", PROCS_PER_NODE="1",
                      STORE_RETRY_DELAY="1")  # fmt: skip
        job_id = submit_self({**env, **s3_env(proxy.url), "DATA": URL}, tmp_path)
        try:
            info = slurm.wait_job(
                job_id, lambda i: i["Restarts"] != "0" or i["JobState"] in FINAL_STATES, 180
            )
        finally:
            slurm.run("scancel", job_id, check=False)
    log = job_log(run_dir, job_id)
    assert info["Restarts"] == "1", f"{info}\n{log}"
    assert_in_order(
        log,
        [
            rf"error: {URL}/manifest.json: object store unreachable after 1 retries .*exit 6",
            rf"object store unreachable through the trainer's retries \(.*reason {UNREACHABLE} .*\): "
            r"requeueing in STORE_RETRY_DELAY=1 s",
            rf"requeueing job {job_id} \(object store unreachable\)",
        ],
    )
    assert not (run_dir / "slurm-crash-requeues").exists()
    assert f"reason {UNREACHABLE}" in RunDir(run_dir).marker("requeue").read_text()
