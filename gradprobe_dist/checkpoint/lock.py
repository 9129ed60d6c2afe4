"""One job per output directory: a lock file naming its holder (host, pid, start time).

The holder keeps the file ``flock``ed while it runs, so the kernel frees the lock the moment
the process dies, however it dies. A lock file left by a dead job on this host is taken over
with a warning. A lock from another host whose ``flock`` did not reach us (a network file
system without lock propagation) cannot be checked: it is refused unless it belongs to this
very SLURM job (a requeue), and the message says which file to delete if that job is gone.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from gradprobe_dist.runtime.log import get_logger

LOCK_NAME = ".gradprobe.lock"

logger = get_logger(__name__)


class DirectoryInUseError(ValueError):
    """Another job writes into this directory."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')} ({holder.get('command')})")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}  # torn by a crash mid-write: nothing to name


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


class DirectoryLock:
    """Hold ``directory/.gradprobe.lock`` until :meth:`release` (or the process ends)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> "DirectoryLock":
        """Take the lock, or raise ``DirectoryInUseError`` naming the job that holds it."""
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held_elsewhere = not self._flock(fd)
                if not held_elsewhere and not self._same_file(fd):
                    continue  # the holder released (unlinked) it while we waited: try again
                holder = _read(fd)
                if held_elsewhere or (holder and not self._gone(holder)):
                    raise DirectoryInUseError(self._in_use(holder))
                if holder:
                    logger.warning("taking over the lock of %s from a job that is gone: %s",
                                   self.directory, _describe(holder))
                self._write_holder(fd)
                self._fd, fd = fd, None
                return self
            finally:
                if fd is not None:
                    os.close(fd)

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one takes a dying lock), and
        the directory if the lock created it and nothing was written there."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _flock(fd: int) -> bool:
        """True if we got the kernel lock; False if a live process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # a file system without flock: the pid check below decides
            pass
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _gone(holder: dict) -> bool:
        """Whether the job that wrote ``holder`` has ended (we hold the flock it held)."""
        if holder.get("host") == socket.gethostname():
            return holder.get("pid") == os.getpid() or not _pid_alive(holder.get("pid"))
        job = os.environ.get("SLURM_JOB_ID")
        return job is not None and holder.get("slurm_job_id") == job  # requeued elsewhere

    def _in_use(self, holder: dict) -> str:
        text = (f"'{self.directory}' is in use by another job ({_describe(holder)}): wait for it "
                "to finish or stop it, or choose another output directory")
        if holder.get("host") not in (None, socket.gethostname()):
            text += f"; if that job is gone, delete {self.path}"
        return text

    @staticmethod
    def _write_holder(fd: int) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:300], "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(holder).encode())
        os.fsync(fd)
