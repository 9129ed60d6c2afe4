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

from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.parallel.base import freeze_all_but
from gradprobe_dist.parallel.collectives import (DistributedCollectives, broadcast_tensor, check_param_names, comm_device,
                          require_process_group)

log = get_logger(__name__)


class DDPBackend(DistributedCollectives, LocalBackend):
    """``LocalBackend`` on every rank, with DDP's bucketed all-reduce in the backward."""

    name = "ddp"
    replicated = True

    def __init__(self, device: torch.device | str | None = None, find_unused_parameters: bool = False):
        """``find_unused_parameters``: set it when some prunable weight takes no part in the
        loss (DDP then checks the graph each step; without it such a weight makes DDP raise)."""
        rank, world_size = require_process_group()
        super().__init__(rank, world_size, device if device is not None else comm_device())
        self.find_unused_parameters = find_unused_parameters
        self._model: nn.Module | None = None
        self._wrapped: DistributedDataParallel | None = None
        self._wrapped_names: frozenset[str] = frozenset()
        self._saved_requires_grad: dict[str, bool] | None = None
        self._params: dict[str, nn.Parameter] = {}

    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        check_param_names(param_names, model)
        names = frozenset(param_names)
        if self._wrapped is not None and model is self._model and names == self._wrapped_names:
            return self._wrapped
        self.release()
        model.to(self.device)
        self._params = dict(model.named_parameters())
        self._saved_requires_grad = freeze_all_but(self._params, names)
        device_ids = [self.device.index] if self.device.index is not None else None
        self._wrapped = DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters)
        self._model, self._wrapped_names = model, names
        log.debug("wrapped the model in DDP for %d prunable weights", len(names))
        return self._wrapped

    def release(self) -> None:
        """Drop the DDP wrapper and restore ``requires_grad``; the model stays usable unwrapped
        (DDP's gradient hooks only act after a forward through the wrapper)."""
        super().release()
        self._wrapped = None

    def scatter_full(self, name: str, full: torch.Tensor | None) -> torch.Tensor:
        """Every rank holds the whole weight, so every rank gets the main rank's whole tensor."""
        return broadcast_tensor(full if self.is_main else None, src=0, device=self.device)
