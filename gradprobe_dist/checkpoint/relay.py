"""The rank-0 checkpoint store: the main rank alone opens, writes and reads checkpoint files;
every rank sees the same answers. Masks are gathered to the main rank to be saved and cut
from it to each rank's local part to be applied, one layer in memory at a time."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Mapping

import torch

from gradprobe_dist.checkpoint.lock import DirectoryLock
from gradprobe_dist.checkpoint.store import MaskCheckpoint
from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.runtime.log import get_logger

logger = get_logger(__name__)


class MainRankFailed(RuntimeError):
    """Raised on the other ranks when the main rank failed, so that no rank waits forever."""


def on_main(backend: Backend, fn: Callable[[], Any], share: bool = False):
    """``fn()`` on the main rank only; its result there, or on every rank with ``share``.
    If it raised, every rank raises (the main rank its own error), so nobody hangs."""
    result, error = None, None
    if backend.is_main:
        try:
            result = fn()
        except Exception as err:  # re-raised on every rank below
            error = err
    message = None if error is None else f"{type(error).__name__}: {error}"
    message, shared = backend.broadcast_object((message, result if share and error is None else None))
    if error is not None:
        raise error
    if message is not None:
        raise MainRankFailed(f"the main rank failed: {message}")
    return shared if share else result


def lock_directory(backend: Backend, directory: str | os.PathLike) -> DirectoryLock | None:
    """The main rank locks ``directory`` for this job; a refusal fails every rank together."""
    return on_main(backend, lambda: DirectoryLock(directory).acquire())


class RankZeroCheckpoint:
    """A :class:`MaskCheckpoint` on the main rank (None elsewhere) and its completed layers
    on every rank."""

    def __init__(self, backend: Backend, checkpoint: MaskCheckpoint | None, completed: list[str]):
        self.backend, self.checkpoint, self.completed = backend, checkpoint, completed

    @classmethod
    def open(cls, backend: Backend, directory: str | os.PathLike, *, fingerprint: Callable[[], dict],
             config: Mapping[str, Any], restart: bool = False, planned: list[str] | None = None,
             drop_from_stage: int | None = None) -> "RankZeroCheckpoint":
        """Create or resume ``directory`` (``MaskCheckpoint.open``); ``fingerprint()`` runs on
        the main rank only (hashing the weights is its cost). ``drop_from_stage`` (0-based)
        forgets that stage and every later one before the remaining files are verified."""
        def open_it():
            ckpt = MaskCheckpoint.open(directory, model_fingerprint=fingerprint(), config=config,
                                       restart=restart, planned=planned)
            if drop_from_stage is not None:
                dropped = ckpt.drop_stages_from(drop_from_stage)
                if dropped:
                    logger.info("redoing from stage %d: %d layer(s) of %s will be probed again",
                                drop_from_stage + 1, len(dropped), directory)
            return ckpt, ckpt.completed()
        return cls(backend, *cls._shared(backend, open_it))

    @classmethod
    def read(cls, backend: Backend, directory: str | os.PathLike,
             check: Callable[[MaskCheckpoint], None] = lambda ckpt: None) -> "RankZeroCheckpoint":
        """An existing checkpoint to apply, after ``check(ckpt)`` on the main rank."""
        def read_it():
            ckpt = MaskCheckpoint.read(directory)
            check(ckpt)
            return ckpt, ckpt.completed()
        return cls(backend, *cls._shared(backend, read_it))

    @staticmethod
    def _shared(backend: Backend, fn) -> tuple[MaskCheckpoint | None, list[str]]:
        opened = on_main(backend, fn)
        ckpt, completed = opened if opened is not None else (None, None)
        return ckpt, backend.broadcast_object(completed)

    def on_main(self, fn: Callable[[MaskCheckpoint], Any], share: bool = False):
        """``fn(checkpoint)`` on the main rank (see :func:`on_main`)."""
        return on_main(self.backend, lambda: fn(self.checkpoint), share=share)

    def summary_rows(self) -> list[dict]:
        return self.on_main(lambda ckpt: ckpt.summary_rows(), share=True)

    def save_layer(self, name: str, local_mask: torch.Tensor, stats: Mapping[str, Any],
                   local_tensors: Mapping[str, torch.Tensor] | None = None,
                   keep: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> None:
        """Gather one layer's mask (and tensors, those named in ``keep`` reduced by its function
        on the main rank) from every rank's local part and save it on the main rank."""
        full = self.backend.gather_full(name, local_mask)
        tensors = {key: self.backend.gather_full(name, t) for key, t in (local_tensors or {}).items()}
        if self.backend.is_main:
            tensors = {key: (keep or {}).get(key, lambda t: t)(t) for key, t in tensors.items()}
        self.on_main(lambda ckpt: ckpt.save_layer(name, full, stats=stats, tensors=tensors or None))
        if name not in self.completed:
            self.completed = [*self.completed, name]

    def local_mask(self, name: str) -> torch.Tensor:
        """One saved layer's mask, read on the main rank and cut to this rank's local part
        (the backend must be prepared)."""
        full = self.on_main(lambda ckpt: ckpt.load_layer(name))
        local = self.backend.scatter_full(name, full)
        return local.to(self.backend.local_weight(name).device)
