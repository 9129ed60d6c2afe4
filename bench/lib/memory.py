"""Memory of the whole process, as the kernel counts it: what a user's machine must hold.

* ``peak_rss_bytes()``: peak resident memory of this process since it started (Linux
  ``VmHWM``): read it at the end of a rank's work, after everything (imports, model load,
  sharding, the job) has happened.
* ``bare_import_peak_rss(["torch", "transformers"])``: the same for a fresh process that only
  imports those modules: subtract it to compare what the work itself costs per rank.
* ``current_rss_bytes``; ``reset_peak_rss`` then ``peak_rss_bytes`` for the peak over a window
  (Linux ``clear_refs``; it ends the whole-life peak, so read that first);
  ``return_freed_memory`` (``gradprobe_dist.runtime.memory``) so RSS follows live memory.

Why not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps it across fork and exec, so a rank
started by torchrun or multiprocessing (fork + exec of a parent that imported torch) reports
at least its parent's peak: measured here, a bare ``python -c`` started by a 600 MB parent
reports ru_maxrss 601 MB and VmHWM 13 MB. ``ru_maxrss`` is only the fallback off Linux.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since exec or the last ``reset_peak_rss``."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def bare_import_peak_rss(modules: Sequence[str] = ("torch",), timeout: float = 300.0) -> int:
    """Peak RSS in bytes of a fresh Python process that imports ``modules`` and nothing else."""
    imports = "".join(f"import {module}; " for module in modules)
    code = f"{imports}from bench.lib.memory import peak_rss_bytes; print(peak_rss_bytes())"
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         timeout=timeout, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1])


def current_rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``), 0 where unknown."""
    fields = _read("/proc/self/statm").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 else 0


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux ``clear_refs``) so ``peak_rss_bytes``
    measures from now on; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_cuda_bytes() -> int | None:
    """Peak CUDA memory torch allocated in this process, None where it used no GPU (torch is
    not imported for the question)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated()


def write_peak_rss(directory: str | Path, rank: int, **extra) -> Path:
    """Record this process's peak RSS (and peak CUDA memory) as ``<directory>/rank-<rank>.json``
    (see ``ranks``)."""
    path = Path(directory) / f"rank-{rank}.json"
    path.write_text(json.dumps({"rank": rank, "peak_rss_bytes": peak_rss_bytes(),
                                "peak_cuda_bytes": peak_cuda_bytes(), **extra}))
    return path


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
