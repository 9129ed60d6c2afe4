"""What the two gradient passes measured: everything a decision needs, and nothing else.

A decision (``gradprobe_dist.probe.decision``) reads only the record and the backend's
collectives, so it can be taken, retaken (a threshold sweep) or checkpointed in between.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gradprobe_dist.parallel.base import LocalSlice

if TYPE_CHECKING:
    from gradprobe_dist.reconstruct.hessians import Hessians


def prune_decision(old: torch.Tensor, new: torch.Tensor, gradient_threshold: float) -> torch.Tensor:
    """True where the weight is redundant: ``new <= old * (1 + gradient_threshold)`` (float32)."""
    return new.float() <= old.float() * (1.0 + gradient_threshold)


def gradient_ratio(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """new/old in float32; 0/0 (no gradient either way) counts as 1, x/0 as +inf."""
    old, new = old.float(), new.float()
    safe = torch.where(old > 0, old, torch.ones_like(old))
    return torch.where(old > 0, new / safe, torch.where(new > 0, torch.full_like(new, float("inf")),
                                                        torch.ones_like(new)))


@dataclass
class LayerProbe:
    """One weight's probe record; every tensor is this rank's local part.

    ``old``/``new``/``originals`` hold only the tentatively selected positions, in the
    row-major order of ``tentative`` (what ``weight.masked_select(tentative)`` returns;
    masked_select/masked_scatter_ are about 2x faster than bool indexing on CPU).
    """

    tentative: torch.Tensor
    old: torch.Tensor
    originals: torch.Tensor
    new: torch.Tensor | None = None
    #: signed mean gradients of the baseline and reduced passes at the same positions (only
    #: when asked for: ``gradprobe_dist.probe.estimate``'s loss-change estimates read them)
    old_signed: torch.Tensor | None = None
    new_signed: torch.Tensor | None = None

    def ratio(self) -> torch.Tensor:
        return gradient_ratio(self.old, self.new)

    def threshold_mask(self, gradient_threshold: float) -> torch.Tensor:
        """Full local mask (True = zero this weight) at ``gradient_threshold``."""
        return self.expand(prune_decision(self.old, self.new, gradient_threshold))

    def expand(self, selected: torch.Tensor) -> torch.Tensor:
        """A full local mask from one flag per tentative position."""
        return torch.zeros_like(self.tentative).masked_scatter_(self.tentative, selected.to(self.tentative.device))


@dataclass
class ProbeRecord:
    """Everything the two gradient passes measured, keyed by parameter name, plus what the
    decision needs to know about the weights (where each local part sits, the strategy's
    N:M pattern, the per-layer sparsity an allocation chose)."""

    layers: dict[str, LayerProbe]
    #: where each rank's local part sits in the full weight (full sizes, layout)
    slices: dict[str, LocalSlice]
    #: per Linear layer, H = 2 X X^T of its calibration inputs (only when asked for, to
    #: reconstruct the kept weights after the decision; each matrix on its owner rank, see
    #: ``gradprobe_dist.reconstruct.hessians``)
    hessians: Hessians | None = None
    #: sparsity per layer when an allocation spread the target unevenly (None: uniform)
    layer_sparsity: dict[str, float] | None = None
    #: (N, M) when the strategy prunes N of every M consecutive input weights
    nm: tuple[int, int] | None = None
    #: weights stored as [in, out] (GPT-2's Conv1D): an output feature is a column
    transposed: frozenset[str] = frozenset()
    #: per weight, the calibration inputs' sum of x_j^2 over all ranks when the strategy used
    #: them, so target mode can score the original weights in the strategy's order again
    input_sq_norms: dict[str, torch.Tensor] | None = None
    #: the factor the candidates were scaled by in the reduced pass
    reduction_factor: float | None = None
    #: mean calibration loss of the baseline and the reduced pass (over batches and ranks)
    losses: tuple[float, float] | None = None

    def masks(self, gradient_threshold: float) -> dict[str, torch.Tensor]:
        return {n: layer.threshold_mask(gradient_threshold) for n, layer in self.layers.items()}
