"""Process-group set-up from whichever launcher started us: torchrun, SLURM's srun, or none.

Why one place: every entry point needs the same answer to "which rank am I, on which
device, talking over which backend", and a plain ``python script.py`` must keep working
as a single process without any process group.

* torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``):
  always forms a group, even of one rank, because the user asked for a launcher.
* ``srun`` without torchrun (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``): forms a
  group when there are several tasks. The rendezvous host is the first host of
  ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``), or 127.0.0.1 on a single node; the
  port is ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID``. The torchrun-style
  variables are then exported so ``env://``, DeepSpeed and the loggers see the same ranks.
* neither: world size 1, no process group.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from gradprobe_dist.runtime.log import get_logger, is_main_process

log = get_logger(__name__)

_DEFAULT_PORT = 29500
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 20000


@dataclass
class DistEnv:
    """Where this process sits: its rank, the world, its device and the backend (None:
    single process, no process group)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return is_main_process(self.rank)


@dataclass(frozen=True)
class Launch:
    """Rank layout and rendezvous address a launcher put in the environment."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; fix or unset {name}") from None


def _check_layout(launch: Launch, rank_var: str, world_var: str) -> Launch:
    if launch.world_size < 1:
        raise ValueError(f"{world_var}={launch.world_size}; it must be at least 1")
    if not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"{rank_var}={launch.rank} is outside [0, {world_var}={launch.world_size}); "
                         f"fix the launcher's variables")
    return launch


def _torchrun_launch(environ: Mapping[str, str]) -> Launch:
    for var, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if var not in environ:
            raise ValueError(f"{other} is set but {var} is not; launch with torchrun or export "
                             f"RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together")
    world_size = _int_var(environ, "WORLD_SIZE")
    rendezvous = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in environ]
    if rendezvous and world_size > 1:
        raise ValueError(f"WORLD_SIZE={world_size} but {' and '.join(rendezvous)} "
                         f"{'is' if len(rendezvous) == 1 else 'are'} not set; launch with torchrun "
                         f"or export MASTER_ADDR (rank 0's host) and MASTER_PORT (a free port)")
    rank = _int_var(environ, "RANK")
    launch = Launch(
        launcher="torchrun", rank=rank, world_size=world_size,
        local_rank=_int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else _DEFAULT_PORT,
    )
    return _check_layout(launch, "RANK", "WORLD_SIZE")


def _slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list with ``scontrol``; empty when scontrol is missing or fails."""
    scontrol = shutil.which("scontrol")
    if not scontrol or not nodelist:
        return []
    try:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def _resolves(host: str) -> bool:
    try:
        socket.gethostbyname(host)
    except OSError:
        return False
    return True


def _slurm_master_addr(environ: Mapping[str, str]) -> str:
    if "MASTER_ADDR" in environ:
        return environ["MASTER_ADDR"]
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
    hosts = _slurm_hostnames(nodelist)
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    single_node = nodes == "1" if nodes else (len(hosts) == 1 or not any(c in nodelist for c in ",["))
    if hosts and _resolves(hosts[0]):
        return hosts[0]
    if single_node:
        return "127.0.0.1"
    raise ValueError(f"cannot find the rendezvous host of multi-node job SLURM_JOB_NODELIST="
                     f"{nodelist!r} (scontrol missing, failing, or its first host does not "
                     f"resolve); export MASTER_ADDR=<first node's address> before srun")


def _slurm_launch(environ: Mapping[str, str]) -> Launch:
    missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS") if v not in environ]
    if missing:
        raise ValueError(f"{' and '.join(missing)} unset in a SLURM step; start the ranks with "
                         f"srun (which sets SLURM_PROCID and SLURM_NTASKS) or with torchrun")
    world_size = _int_var(environ, "SLURM_NTASKS")
    if "MASTER_PORT" in environ:
        port = _int_var(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:  # same job -> same port on every task; jobs differ
        port = _SLURM_PORT_BASE + _int_var(environ, "SLURM_JOB_ID") % _SLURM_PORT_SPAN
    else:
        port = _DEFAULT_PORT
    launch = Launch(
        launcher="slurm", rank=_int_var(environ, "SLURM_PROCID"), world_size=world_size,
        local_rank=_int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
        master_addr=_slurm_master_addr(environ) if world_size > 1 else "127.0.0.1",
        master_port=port,
    )
    return _check_layout(launch, "SLURM_PROCID", "SLURM_NTASKS")


def read_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch described by ``environ`` (default ``os.environ``); None for a plain process
    or a single SLURM task. torchrun's variables win over SLURM's (torchrun inside sbatch)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torchrun_launch(environ)
    if "SLURM_PROCID" in environ or "SLURM_NTASKS" in environ:
        launch = _slurm_launch(environ)
        return launch if launch.world_size > 1 else None
    return None


def _resolve_device(device: str | None, local_rank: int, cuda_default: bool) -> torch.device:
    """One device per local rank: ``cuda`` means ``cuda:LOCAL_RANK``; an explicit index wins."""
    if device is None:
        device = "cuda" if cuda_default and torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; pass 'cpu', 'cuda' or None") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available; pass device='cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return resolved


def _resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', 'gloo' or 'nccl', got {backend!r}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend='nccl' needs a CUDA device but device is {device}; "
                         f"pass backend='gloo' or device='cuda'")
    return backend


def _export_torchrun_vars(launch: Launch) -> None:
    """Put the launch in torchrun's variables: ``env://`` rendezvous reads them, and so do
    DeepSpeed and the loggers, which then see the same ranks under srun."""
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(launch.master_port))


def _existing_group_env(device: str | None) -> DistEnv:
    backend = dist.get_backend()
    rank = dist.get_rank()
    launch = read_launch()
    local_rank = launch.local_rank if launch else rank
    resolved = _resolve_device(device, local_rank, cuda_default="nccl" in backend)
    return DistEnv(rank, dist.get_world_size(), local_rank, resolved, backend)


def init_distributed(backend: str = "auto", device: str | None = None) -> DistEnv:
    """Join the process group the launcher describes (or reuse the one already there).

    ``backend``: "auto" (nccl for a CUDA device, else gloo) or a torch backend name.
    ``device``: None (CUDA when available, else CPU), "cpu", "cuda" (-> cuda:LOCAL_RANK).
    Idempotent: later calls return the same answer without a second group.
    """
    if dist.is_available() and dist.is_initialized():
        return _existing_group_env(device)
    launch = read_launch()
    if launch is None:
        resolved = _resolve_device(device, 0, cuda_default=True)
        _resolve_backend(backend, resolved)  # same argument checks as a distributed run
        return DistEnv(0, 1, 0, resolved, None)
    if not dist.is_available():
        raise RuntimeError(f"{launch.launcher} started {launch.world_size} ranks but this torch "
                           f"build has no torch.distributed; install a torch build with it")
    resolved = _resolve_device(device, launch.local_rank, cuda_default=True)
    backend = _resolve_backend(backend, resolved)
    _export_torchrun_vars(launch)
    # env:// (the default) lets torchrun's workers reuse the agent's store on MASTER_PORT.
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    log.info("joined %s group via %s: rank %d of %d on %s", backend, launch.launcher,
             launch.rank, launch.world_size, resolved)
    return DistEnv(launch.rank, launch.world_size, launch.local_rank, resolved, backend)


def destroy_distributed() -> None:
    """Leave and destroy the default process group, if any (safe to call twice). Through
    DeepSpeed when it joined the group, so that its copies of the group handles go too."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
