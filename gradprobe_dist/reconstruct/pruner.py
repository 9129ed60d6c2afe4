"""Plain SparseGPT as a pruner of its own: one forward pass, no gradients, any backend.

The forward pass over the calibration batches records each Linear layer's ``H = 2 X X^T``
(averaged over ranks, weighted by the inputs each saw); then every layer is pruned with
SparseGPT's adaptive mask and OBS update (``layers.sparsegpt_masks``). Hessians come from
the dense model for all layers at once (one pass), not block after block; run the pipeline
with one transformer block per stage for the sequential variant of the reference.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe.batches import LossOfBatch, make_loss_of_batch, take_batches, to_device
from gradprobe_dist.probe.params import find_prunable
from gradprobe_dist.reconstruct.hessians import Hessians, average_over_ranks, collect_input_hessians
from gradprobe_dist.reconstruct.layers import sparsegpt_masks
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.strategies.base import parse_pattern, transposed_names

log = get_logger(__name__)


class SparseGPT:
    """SparseGPT (Frantar & Alistarh, 2023) for the prunable Linear weights of ``model``.

    ``pattern``: ``"2:4"``-style N:M (default unstructured). ``blocksize``/``percdamp``: the
    reference's column block and Hessian damping. ``include``/``exclude``/``extra_prunable``
    choose the weights as for ``GradProbe``; each must belong to a Linear layer.
    """

    def __init__(self, model: nn.Module, device=None, *, backend: Backend | None = None,
                 pattern: str | None = None, blocksize: int = 128, percdamp: float = 0.01,
                 include: list[str] | None = None, exclude: list[str] | None = None,
                 extra_prunable: list[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.backend = backend if backend is not None else LocalBackend(device=device or "cpu")
        self.nm = parse_pattern(pattern)
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.owners = find_prunable(model, include, exclude, extra_prunable)
        self.param_names = list(self.owners)
        self.masks: dict[str, torch.Tensor] = {}

    def prune(self, dataloader: Iterable, sparsity: float = 0.5, num_batches: int = 10, *,
              loss_fn: Callable | None = None, compute_loss: LossOfBatch | None = None,
              verbose: bool = False) -> dict[str, torch.Tensor]:
        """Prune in place; returns the masks (True = pruned, local shape) by parameter name.

        Batches are forwarded as ``GradProbe`` would (``loss_fn``/``compute_loss``, see
        ``gradprobe_dist.probe.batches``); the loss itself is not used. With a pattern,
        ``sparsity`` must be N/M.
        """
        if self.nm and abs(sparsity - self.nm[0] / self.nm[1]) > 1e-9:
            raise ValueError(f"pattern {self.nm[0]}:{self.nm[1]} prunes {self.nm[0]} of every "
                             f"{self.nm[1]} weights: pass sparsity={self.nm[0] / self.nm[1]} (got {sparsity})")
        hessians = self.hessians(dataloader, num_batches, loss_fn, compute_loss)
        self.masks = self.prune_from(hessians, sparsity)
        if verbose and self.backend.is_main:
            log.info("rank 0: SparseGPT pruned %d layers to %s", len(self.masks),
                     f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{100 * sparsity:.2f}%")
        return self.masks

    def hessians(self, dataloader: Iterable, num_batches: int, loss_fn: Callable | None = None,
                 compute_loss: LossOfBatch | None = None) -> Hessians:
        """One forward pass over ``num_batches`` batches; every layer's H, averaged over ranks
        onto its owner rank (see ``reconstruct.hessians``)."""
        batches = take_batches(dataloader, num_batches)
        loss_of = make_loss_of_batch(loss_fn, compute_loss)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        wrapped = self.backend.prepare(self.model, self.param_names)
        try:
            with torch.no_grad(), collect_input_hessians(self.owners) as local:
                for batch in batches:
                    loss_of(wrapped, to_device(batch, self.backend.device))
            missing = [n for n in self.param_names if n not in local]
            if missing:
                raise ValueError(f"SparseGPT needs every pruned weight to belong to a Linear layer "
                                 f"that calibration reaches; {missing[0]!r} does not: exclude it")
            return average_over_ranks(local, self.backend)
        finally:
            for module, training in modes.items():
                module.training = training
            self.backend.release()

    def prune_from(self, hessians: Hessians | Mapping[str, torch.Tensor], sparsity: float,
                   vetoes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """SparseGPT on the current (dense) weights from given Hessians; see ``layers``."""
        self.backend.prepare(self.model, self.param_names)  # where the shards live
        try:
            return sparsegpt_masks(self.backend, hessians, sparsity, nm=self.nm, vetoes=vetoes,
                                   transposed=transposed_names(self.owners),
                                   blocksize=self.blocksize, percdamp=self.percdamp)
        finally:
            self.backend.release()
