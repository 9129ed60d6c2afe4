"""A real single-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd.

``with SlurmCluster.running() as cluster:`` writes a munge key and a ``slurm.conf`` into a
fresh scratch directory, starts the three daemons as daemons with pid files, waits until
``sinfo`` reports the node idle, and on exit cancels every job and kills the daemons by their
pid files. Client commands go through ``cluster.run(...)``, which points ``SLURM_CONF`` at the
scratch config (jobs inherit it). Ports are picked free, so two clusters can coexist.

Two partitions share the node: ``batch`` (default, preemptable: its jobs are requeued and,
with ``preempt_send_user_signal``, first get their ``--signal``) and ``urgent`` (higher
priority tier, preempts ``batch``). Needs root and the Debian packages installed by
``scripts/install_slurm.sh``; ``missing_requirements()`` says what is absent.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
#: seconds between the preemption signal and the kill: time for the batch script's trap
GRACE_SECONDS = 30


def missing_requirements() -> list[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    missing = []
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=SEARCH_PATH) is None]
    if absent:
        missing.append(f"{', '.join(absent)} (bash scripts/install_slurm.sh installs them)")
    if os.geteuid() != 0:
        missing.append("root (slurmd and munged's user switch need it)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("the munge user (created by the munge package)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class SlurmCluster:
    """One controller and one compute node on 127.0.0.1, all state in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        outside = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # e.g. CI under SLURM
        self.env = dict(outside, SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)

    @classmethod
    @contextlib.contextmanager
    def running(cls, start_timeout: float = 60.0):
        missing = missing_requirements()
        if missing:
            raise RuntimeError("cannot start a SLURM test cluster, missing: " + "; ".join(missing))
        # Not pytest's tmp_path: its parents are mode 0700, which the munge user cannot enter.
        root = Path(tempfile.mkdtemp(prefix="gradprobe-slurm-"))
        root.chmod(0o755)
        cluster = cls(root)
        try:
            cluster.start(start_timeout)
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)

    # -- start / stop ---------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        munge = pwd.getpwnam("munge")
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        socket_path = munge_dir / "munge.socket"
        subprocess.run(
            [self._bin("munged"), f"--key-file={key}", f"--socket={socket_path}",
             f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
             f"--seed-file={munge_dir / 'munged.seed'}"],
            user="munge", group="munge", extra_groups=[], check=True, capture_output=True, timeout=30)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        self.conf.write_text(self._slurm_conf(socket_path))
        self._daemon("slurmctld", "-i")  # -i: ignore any saved state
        self._daemon("slurmd")
        try:
            wait_until(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
                       timeout, "the node to become idle")
        except TimeoutError as err:  # the scratch directory goes at teardown: show its logs now
            logs = [self.root / "slurmctld.log", self.root / "slurmd.log", munge_dir / "munged.log"]
            tails = "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text().splitlines()[-15:])
                              for p in logs if p.exists())
            raise TimeoutError(f"{err}\n{tails}") from None

    def stop(self) -> None:
        """Cancel every job, wait briefly for it to end, kill the daemons; never raises."""
        if self.conf.exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError, TimeoutError):
                self.run("scancel", "--full", "--user=root", check=False)
                wait_until(lambda: not self.run("squeue", "-h", check=False).stdout.strip(),
                           20, "cancelled jobs to end")
        pids = [self._pid(self.root / name) for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid")]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in pids if pid is not None and self._signal(pid, sig)]
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not any(self._signal(pid, 0) for pid in alive), 5, "daemons to exit", 0.05)

    @staticmethod
    def _pid(pid_file: Path) -> int | None:
        try:
            return int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _signal(pid: int, sig: int) -> bool:
        """Send ``sig`` (0: just probe); False when the process is gone."""
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):  # gone (its pid may be someone else's now)
            return False
        return True

    def _daemon(self, name: str, *args: str) -> None:
        subprocess.run([self._bin(name), "-f", str(self.conf), *args], env=self.env,
                       check=True, capture_output=True, timeout=30)

    @staticmethod
    def _bin(name: str) -> str:
        return shutil.which(name, path=SEARCH_PATH)

    def _slurm_conf(self, munge_socket: Path) -> str:
        node = subprocess.run([self._bin("slurmd"), "-C"], check=True, capture_output=True,
                              text=True, timeout=30).stdout.splitlines()[0]
        host = socket.gethostname().split(".")[0]
        r = self.root
        return f"""\
ClusterName=gradprobe-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SchedulerParameters=bf_interval=1,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={GRACE_SECONDS}
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""

    # -- client commands ------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        result = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                                text=True, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        """Submit a batch job; its id."""
        return int(self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0])

    def state(self, job_id: int) -> str:
        """The job's state (PENDING, RUNNING, COMPLETED, ...); from scontrol, so it still
        answers after the job left squeue (``sbatch --wait`` would poll only every 10 s)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return re.search(r"\bJobState=(\S+)", out).group(1)

    def wait_finished(self, job_id: int, timeout: float) -> str:
        """Wait until the job is in no queue any more; its final state."""
        wait_until(lambda: not self.run("squeue", "-h", "-j", str(job_id), check=False).stdout.strip(),
                   timeout, f"job {job_id} to finish", interval=0.5)
        return self.state(job_id)
