"""Real ranks for the benchmarks, each reporting its whole-process peak RSS at the end.

* ``run_ranks(fn, world_size, *args)``: ``fn(rank, world_size, *args)`` on ``world_size``
  spawned processes in one gloo process group (one thread each); returns one ``RankResult``
  per rank: fn's return value and the process's peak RSS read after fn returned. Any rank
  failing fails the call with that rank's traceback; a hang past ``timeout`` kills them all.
* ``torchrun_module(module, args, nproc)``: ``module`` (e.g. ``gradprobe_dist.cli``) as
  ``__main__`` on ``nproc`` ranks under torchrun (``nproc=None``: one plain process), each
  wrapped by ``bench.lib.rank_rss`` so it records its peak RSS (and peak CUDA memory, where
  it used a GPU) when the module exits.

Compare per-rank peaks against ``memory.bare_import_peak_rss`` (the import-only floor).
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.multiprocessing as mp


@dataclass
class RankResult:
    rank: int
    value: object
    peak_rss_bytes: int


@dataclass
class TorchrunResult:
    returncode: int
    wall_s: float
    output: str
    ranks: list[dict] = field(default_factory=list)  # {"rank", "peak_rss_bytes", "peak_cuda_bytes", "exit_code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0, env: dict | None = None) -> list[RankResult]:
    """See the module docstring; ``fn`` must be importable (defined at a module's top level)."""
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as results:
        context = mp.start_processes(_rank_main, (world_size, free_port(), fn, args, results, env or {}),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1.0):  # raises with the traceback of a failed rank
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [pickle.loads((Path(results) / f"rank-{r}.pkl").read_bytes()) for r in range(world_size)]


def _rank_main(rank: int, world_size: int, port: int, fn, args: tuple, results: str, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from bench.lib.memory import peak_rss_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        value = fn(rank, world_size, *args)
        result = RankResult(rank, value, peak_rss_bytes())
        (Path(results) / f"rank-{rank}.pkl").write_bytes(pickle.dumps(result))  # tensors copied, not shared
    finally:
        dist.destroy_process_group()


def torchrun_module(module: str, args: list[str], nproc: int | None, *, timeout: float = 600.0,
                    env: dict | None = None, cwd: str | Path | None = None) -> TorchrunResult:
    """See the module docstring. The command's stdout and stderr come back together in ``output``."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as rss:
        wrapped = ["-m", "bench.lib.rank_rss", rss, module, *args]
        launcher = [sys.executable] if nproc is None else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        root = Path(__file__).resolve().parents[2]  # bench/ must be importable in every rank
        paths = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
        start = time.perf_counter()
        proc = subprocess.run([*launcher, *wrapped], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": paths, **(env or {})})
        wall = time.perf_counter() - start
        ranks = sorted((json.loads(p.read_text()) for p in Path(rss).glob("rank-*.json")), key=lambda r: r["rank"])
    return TorchrunResult(proc.returncode, wall, proc.stdout + proc.stderr, ranks)
