"""Helpers the benchmark scripts share: two clocks, machine facts, process memory, Markdown
tables, result files, and a launcher that runs a function on real gloo ranks.

Why two clocks: the wall clock is what a user waits for, but on a shared machine it also
counts time other processes took; the process CPU clock (one thread per process) does not,
so a ratio measured in both says whether a difference is ours or the neighbours'.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# fn(rank, world_size, *args) on N local gloo processes, one thread each, with a hard timeout
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from multiproc import run_ranks as launch_ranks  # noqa: E402,F401


# -- clocks ------------------------------------------------------------------------------------
@dataclass
class Seconds:
    """Elapsed wall-clock and process-CPU seconds of one measurement."""

    wall: float
    cpu: float


def timed(fn: Callable, *args, **kwargs) -> tuple[object, Seconds]:
    """``fn(*args, **kwargs)`` and how long it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, Seconds(time.perf_counter() - wall, time.process_time() - cpu)


def median(samples: Sequence[Seconds]) -> Seconds:
    """Per-clock median of repeated measurements."""
    return Seconds(statistics.median(s.wall for s in samples), statistics.median(s.cpu for s in samples))


# -- machine and memory -----------------------------------------------------------------------
def machine() -> dict:
    """What the numbers were measured on (recorded next to them)."""
    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    import torch

    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "threads_per_process": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def peak_rss_bytes() -> int:
    """Peak resident memory of this process over its whole life (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``), 0 where unknown."""
    fields = " ".join(_read_lines("/proc/self/statm")).split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 else 0


def return_freed_memory() -> bool:
    """Make glibc hand blocks of 1 MiB or more back to the kernel as soon as they are freed
    (fixed mmap and trim thresholds instead of adaptive ones) and trim the heap now, so that
    RSS follows live memory instead of what the allocator keeps for reuse. This makes large
    allocations slower: call it after the timings. False where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD in malloc.h
    ok = mallopt(mmap_threshold, 1 << 20) == 1 and mallopt(trim_threshold, 1 << 20) == 1
    malloc_trim(0)
    return ok


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux ``clear_refs``) so ``rss_high_water_bytes``
    measures from now on; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_high_water_bytes() -> int | None:
    """Peak RSS since the last ``reset_peak_rss`` (``VmHWM``), None where unknown."""
    for line in _read_lines("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


# -- output -----------------------------------------------------------------------------------
def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a Markdown table; ``columns`` are (key, header, format spec), None prints "-"."""
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key), spec) for key, _, spec in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path


