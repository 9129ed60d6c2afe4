"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a temporary file in the same directory, fsynced,
    ``os.replace``d over its target, then the directory fsynced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_temp_files(directory: Path, names: list[str]) -> None:
    """Temporary files ``atomic_write`` left behind when its writer was killed: never valid
    data. ``names`` are glob patterns of the targets (``layers/*.safetensors``), so nobody
    else's ``.tmp`` files are touched."""
    for pattern in names:
        parent, _, name = pattern.rpartition("/")
        for leftover in (directory / parent).glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
