"""FSDP2 (``fully_shard``): each rank keeps rows [start, stop) of every weight (``Shard(0)``,
uneven first dims split like ``torch.chunk``, so a rank may hold no rows).

Parameters and gradients are DTensors; the local part is ``to_local()``, which shares
storage with the sharded parameter, so in-place edits (under ``no_grad``) change the model.
FSDP2 reduce-scatters gradients averaged over ranks (default divide factor = world size).

Sharding cannot be undone, so it happens on the first ``prepare`` only; later calls (one
per pipeline stage) reuse it and only switch ``requires_grad``, which FSDP2 honours
between steps. Trap: after a forward, a module FSDP keeps unsharded (the root's own
parameters) computes with an all-gathered copy, and an edit of the local shard would not be
seen; ``commit_weights`` therefore reshards every FSDP module, so the next forward
all-gathers the edited shards.
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from gradprobe_dist.parallel.base import Backend, LocalSlice, drop_grads, freeze_all_but, restore_requires_grad
from gradprobe_dist.parallel.collectives import (ProcessGroup, check_param_names, comm_device, gather_rows,
                                                 scatter_rows)
from gradprobe_dist.parallel.loading import WeightReader, fill_local_parts, real_buffers, restore_buffers
from gradprobe_dist.runtime.log import get_logger

log = get_logger(__name__)


def unit_names(model: nn.Module, param_names: list[str], patterns: list[str] | None = None) -> list[str]:
    """Names of the modules to shard one by one before the root.

    ``patterns`` (fnmatch over ``model.named_modules()`` names, part by dot-separated part,
    so ``"layers.*"`` picks ``layers.0`` but not ``layers.0.mlp``) pick them; by default every
    child of an ``nn.ModuleList`` (transformer blocks), and without any ModuleList every
    module that directly owns a prunable weight (e.g. each ``nn.Linear``). Modules without
    parameters are left to their parent.
    """
    modules = dict(model.named_modules())
    if patterns is not None:
        names = [name for name in modules if name and any(_matches(name, p) for p in patterns)]
        if not names:
            raise ValueError(f"unit_patterns {patterns} match no module name: use fnmatch patterns "
                             "of names from model.named_modules(), e.g. 'layers.*'")
    else:
        names = [f"{list_name}.{child}" if list_name else child
                 for list_name, module in modules.items() if isinstance(module, nn.ModuleList)
                 for child, _ in module.named_children()]
        if not names:
            owners = {name.rpartition(".")[0] for name in param_names}
            names = [name for name in modules if name and name in owners]
    return [name for name in names if next(modules[name].parameters(), None) is not None]


def _matches(name: str, pattern: str) -> bool:
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(map(fnmatch, parts, pattern_parts))


class FSDPBackend(Backend):
    """FSDP2's sharded parameters; ``release`` restores ``requires_grad`` (the sharding
    itself stays, FSDP2 cannot undo it)."""

    name = "fsdp"
    replicated = False

    def __init__(self, device: torch.device | str | None = None, unit_patterns: list[str] | None = None):
        """``unit_patterns``: patterns of module names (e.g. ``"layers.*"``, see ``unit_names``)
        to shard as their own FSDP units before the root; None: the default of ``unit_names``."""
        collectives = ProcessGroup()
        super().__init__(device if device is not None else comm_device(), collectives)
        self.unit_patterns = unit_patterns
        self._model: nn.Module | None = None
        self._params: dict[str, DTensor] = {}
        self._slices: dict[str, LocalSlice] = {}
        self._saved_requires_grad: dict[str, bool] | None = None

    # -- model ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        check_param_names(param_names, model)
        self.release()
        if not isinstance(model, FSDPModule):
            self._shard(model, param_names)
        self._model = model
        self._reshard()  # the registered parameters are the sharded DTensors only when resharded
        self._params = dict(model.named_parameters())
        self._slices = {name: _row_slice(self._params[name]) for name in param_names}
        self._saved_requires_grad = freeze_all_but(self._params, param_names)
        return model

    def _shard(self, model: nn.Module, param_names: list[str]) -> None:
        units = unit_names(model, param_names, self.unit_patterns)
        modules = dict(model.named_modules())
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        if not any(p.is_meta for p in model.parameters()):  # meta: ``load_sharded`` fills it
            model.to(self.device)
        # deepest first: a unit's parameters must be claimed before an enclosing unit is sharded
        for name in sorted(units, key=lambda n: n.count("."), reverse=True):
            fully_shard(modules[name], mesh=mesh)
        fully_shard(model, mesh=mesh)
        log.info("FSDP2: sharded %d units and the root over %d ranks", len(units), self.world_size)

    def load_sharded(self, model: nn.Module, param_names: list[str], reader: WeightReader) -> None:
        """Shard ``model`` (parameters on the meta device), then read each rank's rows of every
        weight from ``reader``: no rank ever holds a whole weight, let alone the model."""
        buffers = real_buffers(model)
        self._shard(model, param_names)
        model.to_empty(device=self.device)
        restore_buffers(model, buffers, self.device)
        fill_local_parts(model, reader, _row_slice, DTensor.to_local)

    def release(self) -> None:
        restore_requires_grad(self._params, self._saved_requires_grad)
        self._saved_requires_grad = None

    def _reshard(self) -> None:
        for module in self._model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # -- gradients and weights -------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        drop_grads(self._params)

    def local_grad(self, name: str) -> torch.Tensor | None:
        grad = self._params[name].grad
        return None if grad is None else grad.to_local()

    def local_weight(self, name: str) -> torch.Tensor:
        return self._params[name].to_local()

    def local_slice(self, name: str) -> LocalSlice:
        return self._slices[name]

    def local_part(self, param: nn.Parameter) -> torch.Tensor:
        return param.to_local() if isinstance(param, DTensor) else param.detach()

    def gather_parameter(self, param: nn.Parameter) -> torch.Tensor | None:
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        return full if self.is_main else None

    def commit_weights(self, names: list[str]) -> None:
        """Drop any all-gathered copies, so the next forward gathers the edited shards."""
        self._reshard()

    # -- sharded tensors -------------------------------------------------------------------
    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor | None:
        part = self._slices[name]
        return gather_rows(local, part.start, part.stop, part.full_shape, dst=0)

    def scatter_full(self, name: str, full: torch.Tensor | None) -> torch.Tensor:
        part = self._slices[name]
        return scatter_rows(full if self.is_main else None, part.start, part.stop, src=0, device=self.device)


def _row_slice(param: DTensor) -> LocalSlice:
    """Rows of the full weight held by this rank, as FSDP2 laid them out (an empty shard
    starts at the end of dim 0)."""
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return LocalSlice(param.shape, "rows", offset[0], offset[0] + local_shape[0])
