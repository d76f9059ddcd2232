"""A throwaway Slurm cluster on localhost for tests: munged, slurmctld and slurmd(s), private to a temp dir.

Everything it starts (daemons, state, logs, sockets, ports) belongs to one instance, so two instances never
meet and `stop()` leaves nothing running. Clients reach it through `SLURM_CONF` in `env`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Debian packages that provide the commands the tests call.
SLURM_PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}

# A requeued job may start again only after its credential expires (AuthInfo cred_expire, 120 s by default);
# 5 s keeps the preemption test short. A real site keeps the default.
CRED_EXPIRE_S = 5


def ensure_commands(packages: dict[str, str]) -> str | None:
    """Install the Debian packages that provide missing commands; a skip reason where that is impossible.

    Installing needs root and apt-get: without them the caller skips with the returned reason. With them, a
    failed install is an error, not a skip.
    """
    missing = sorted({pkg for cmd, pkg in packages.items() if shutil.which(cmd) is None})
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed and installing needs root (running as uid {os.geteuid()})"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and apt-get is not available to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr}"
            )
    still = [cmd for cmd in packages if shutil.which(cmd) is None]
    if still:
        raise RuntimeError(f"apt-get installed {missing} but {still} are still not on PATH")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


class LocalSlurm:
    """munged + slurmctld + one slurmd per node on localhost, each node with every CPU; partition `debug`.

    Two nodes are two slurmd daemons on this host (`slurmd -N`), named after its two resolvable names, the
    host name and `localhost`, so that the job's first node name serves as the rendezvous address just as
    it does on a real cluster.
    """

    def __init__(self, nodes: int = 1) -> None:
        if nodes not in (1, 2):
            raise ValueError(f"nodes={nodes}: this host has two resolvable names, so 1 or 2 nodes")
        self.root = Path(tempfile.mkdtemp(prefix="dist-vae-slurm-"))
        self.root.chmod(0o755)  # munged runs as `munge` and must reach its socket directory
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host, "localhost"][:nodes]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _write_munge_files(self) -> Path:
        munge_dir = self.root / "munge"
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # clients of every uid need execute permission on the socket directory
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (munge_dir, key):
            shutil.chown(path, "munge", "munge")
        return munge_dir

    def _write_conf(self, socket_path: Path) -> None:
        r = self.root
        lines = [
            f"ClusterName=distvae{os.getpid()}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Pending jobs (a requeued one) are looked at every second instead of every 30/60 s.
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            # Distinct job ids per instance: the scripts derive the rendezvous port from the job id.
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            "JobRequeue=1",
            "ReturnToService=2",
            "KillWait=5",
            # sbatch --wait polls every min(32, MinJobAge / 2) s or so; 16 s keeps its polls 8 s apart.
            "MinJobAge=16",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            *(
                f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()}"
                f" CPUs={os.cpu_count()} State=UNKNOWN"
                for node in self.nodes
            ),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        (r / "state").mkdir()
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str], **kwargs: object) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - the daemon owns it until stop()
        self._procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)))

    def _wait_for(self, what: str, check: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}"
                    )
            if check():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def start(self, timeout: float = 60) -> LocalSlurm:
        munge_dir = self._write_munge_files()
        socket_path = munge_dir / "munge.socket"
        self._write_conf(socket_path)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={munge_dir / 'munge.key'}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
            user="munge",
            group="munge",
        )
        self._wait_for("munged's socket", socket_path.exists, timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env)
        self._wait_for("slurmctld", lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, timeout)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)], env=self.env)
        self._wait_for(
            "the nodes to be idle", lambda: self.node_states() == ["idle"] * len(self.nodes), timeout
        )
        return self

    def node_states(self) -> list[str]:
        return self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_job(self, job_id: str, until: object, timeout: float) -> dict[str, str]:
        """Poll the job until `until(info)` holds; fail with the daemons' logs otherwise."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while not until(info):  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} after {timeout:.0f} s: {info}\n{self.logs()}")
            time.sleep(0.5)
            info = self.job(job_id)
        return info

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{_tail(self.root / name)}"
            for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in self.nodes), "munged.out")
        )

    def stop(self) -> None:
        """Cancel every job of this cluster, wait for them to go, stop the daemons, remove the temp dir."""
        try:
            if self.conf.exists() and any(name == "slurmctld" for name, _ in self._procs):
                self.run("scancel", f"--user={os.getuid()}", check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.5)
        finally:
            for _, proc in reversed(self._procs):
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._procs.clear()
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
