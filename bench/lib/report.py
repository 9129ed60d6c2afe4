"""What every benchmark writes: a Markdown table printed and saved, and JSON that records the
machine and command next to the numbers (a ratio means nothing without where it was measured).

    meta = run_meta(smoke=args.smoke)            # command, date, CPU, memory, versions, load
    write_report(out, "scale", {"meta": meta, "rows": rows},
                 markdown_table(rows, [("model", "model", "s"), ("peak_rss_mib", "peak RSS (MiB)", ".0f")]))
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


def machine() -> dict:
    """What the numbers were measured on: date, CPU, memory, OS, versions, threads, load, GPU."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_cores": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "deepspeed": _version("deepspeed"),
        "threads_per_process": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def describe_machine(info: dict | str) -> str:
    """One line for a report's header (older reports stored that line already)."""
    if isinstance(info, str):
        return info
    return (f"{info['cpu_cores']} x {info['cpu_model']}{', ' + info['gpu'] if info.get('gpu') else ''}, "
            f"{info['memory_gib']} GiB, torch {info['torch']}, {info['threads_per_process']} thread(s) per process, "
            f"load average {info['load_average_1m_at_start']:.2f} at the start ({info['date_utc']})")


def run_meta(smoke: bool = False, **extra) -> dict:
    """``meta`` of a report: the command that produced it, smoke or not, and the machine."""
    return {"command": command_line(), "smoke": smoke, "machine": machine(), **extra}


def command_line() -> str:
    """How this process was started, as a user would type it (``python -m bench.x ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std, min, max and count of repeated measurements (seeds, repeats)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a Markdown table; ``columns`` are (key, header, format spec), None prints "-"."""
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key), spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (``data``, which should carry ``run_meta()`` as ``meta``) and
    ``<stem>.md`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown.rstrip("\n") + "\n")
    return json_path, md_path


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
