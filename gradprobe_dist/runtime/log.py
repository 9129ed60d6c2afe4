"""Rank-aware logging: every line says which rank speaks; progress belongs to rank 0."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return True


def get_logger(name: str = "gradprobe_dist") -> logging.Logger:
    """A logger whose lines start with ``[rank N]``; configured once, on first use."""
    global _CONFIGURED
    root = logging.getLogger("gradprobe_dist")
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("GRADPROBE_LOG_LEVEL", "INFO"))
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name)


def is_main_process(rank: int | None = None) -> bool:
    """The one rank-0 check: True on the rank that logs progress and writes shared files.
    ``rank`` defaults to the launcher's rank of this process (0 without a launcher)."""
    return (_rank() if rank is None else rank) == 0
