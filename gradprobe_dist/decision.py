"""The probe's decision, as pure tensor functions over what the two passes recorded.

A tentatively selected weight is redundant (pruned) when its gradient statistic after the
reduction did not grow by more than ``gradient_threshold``:
``new <= old * (1 + gradient_threshold)``; otherwise it is restored. The decision depends
only on new/old, so one probe serves every threshold of a sweep.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def prune_decision(old: torch.Tensor, new: torch.Tensor, gradient_threshold: float) -> torch.Tensor:
    """True where the weight is redundant (compared in float32)."""
    return new.float() <= old.float() * (1.0 + gradient_threshold)


@dataclass
class LayerProbe:
    """One weight's probe record; every tensor is this rank's local part.

    ``old``/``new``/``originals`` hold only the tentatively selected positions, in the
    row-major order of ``tentative`` (what ``weight[tentative]`` returns).
    """

    tentative: torch.Tensor
    old: torch.Tensor
    originals: torch.Tensor
    new: torch.Tensor | None = None

    def pruned_mask(self, gradient_threshold: float) -> torch.Tensor:
        """Full local mask (True = zero this weight) at ``gradient_threshold``."""
        mask = torch.zeros_like(self.tentative)
        mask[self.tentative] = prune_decision(self.old, self.new, gradient_threshold).to(mask.device)
        return mask

    def decided_values(self, gradient_threshold: float) -> torch.Tensor:
        """Values for the tentative positions: 0 where pruned, the exact original elsewhere."""
        prune = prune_decision(self.old, self.new, gradient_threshold).to(self.originals.device)
        return torch.where(prune, torch.zeros_like(self.originals), self.originals)


@dataclass
class ProbeRecord:
    """Everything the two gradient passes measured, keyed by parameter name."""

    layers: dict[str, LayerProbe]

    def masks(self, gradient_threshold: float) -> dict[str, torch.Tensor]:
        return {n: layer.pruned_mask(gradient_threshold) for n, layer in self.layers.items()}
