"""DistributedDataParallel: every rank holds the whole model; DDP averages gradients
over ranks in buckets during backward, so each rank sees the gradient of the global batch.

Only the prunable weights keep ``requires_grad`` (less backward work and smaller buckets),
so the DDP wrapper depends on the set of prunable weights: ``prepare`` reuses the wrapper
while that set is unchanged and builds a new one (cheap) when it changes; ``release``
drops it and restores ``requires_grad``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from gradprobe_dist.parallel.base import Backend, LocalSlice
from gradprobe_dist.parallel.collectives import ProcessGroup, broadcast_tensor, check_param_names, comm_device
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.runtime.log import get_logger

log = get_logger(__name__)


class DDPBackend(Backend):
    """A ``LocalBackend`` on every rank (it holds the gradients and weights), with DDP's
    bucketed all-reduce in the backward."""

    name = "ddp"
    replicated = True

    def __init__(self, device: torch.device | str | None = None, find_unused_parameters: bool = False):
        """``find_unused_parameters``: set it when some prunable weight takes no part in the
        loss (DDP then checks the graph each step; without it such a weight makes DDP raise)."""
        collectives = ProcessGroup()
        super().__init__(device if device is not None else comm_device(), collectives)
        self.find_unused_parameters = find_unused_parameters
        self._local = LocalBackend(device=self.device)
        self._model: nn.Module | None = None
        self._wrapped: DistributedDataParallel | None = None
        self._wrapped_names: frozenset[str] = frozenset()

    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        check_param_names(param_names, model)
        names = frozenset(param_names)
        if self._wrapped is not None and model is self._model and names == self._wrapped_names:
            return self._wrapped
        self.release()
        self._local.prepare(model, param_names)
        device_ids = [self.device.index] if self.device.index is not None else None
        self._wrapped = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters)
        self._model, self._wrapped_names = model, names
        log.debug("wrapped the model in DDP for %d prunable weights", len(names))
        return self._wrapped

    def release(self) -> None:
        """Drop the DDP wrapper and restore ``requires_grad``; the model stays usable unwrapped
        (DDP's gradient hooks only act after a forward through the wrapper)."""
        self._local.release()
        self._wrapped = None

    def backward(self, loss: torch.Tensor) -> None:
        self._local.backward(loss)

    def zero_grad(self) -> None:
        self._local.zero_grad()

    def local_grad(self, name: str) -> torch.Tensor | None:
        return self._local.local_grad(name)

    def local_weight(self, name: str) -> torch.Tensor:
        return self._local.local_weight(name)

    def local_slice(self, name: str) -> LocalSlice:
        return self._local.local_slice(name)

    def scatter_full(self, name: str, full: torch.Tensor | None) -> torch.Tensor:
        """Every rank holds the whole weight, so every rank gets the main rank's whole tensor."""
        return broadcast_tensor(full if self.is_main else None, src=0, device=self.device)
