"""Parallel modes behind one interface (``base.Backend``), chosen by name in the config."""
from __future__ import annotations

import torch

from gradprobe_dist.parallel.base import Backend, LocalSlice
from gradprobe_dist.parallel.local import LocalBackend


def build_backend(parallel: str, device: torch.device, *, fsdp_units: list[str] | None = None,
                  micro_batch_size: int = 1) -> Backend:
    """The backend for ``parallel`` (none | ddp | fsdp | zero3); distributed ones need an
    initialised process group (``gradprobe_dist.runtime.env.init_distributed``)."""
    if parallel == "none":
        return LocalBackend(device=device)
    if parallel == "ddp":
        from gradprobe_dist.parallel.ddp import DDPBackend
        return DDPBackend(device=device)
    if parallel == "fsdp":
        from gradprobe_dist.parallel.fsdp import FSDPBackend
        return FSDPBackend(device=device, unit_patterns=fsdp_units)
    if parallel == "zero3":
        from gradprobe_dist.parallel.zero3 import Zero3Backend
        return Zero3Backend(device=device, micro_batch_size=micro_batch_size)
    raise ValueError(f"unknown parallel mode {parallel!r}: choose none, ddp, fsdp or zero3")


__all__ = ["Backend", "LocalSlice", "LocalBackend", "build_backend"]
