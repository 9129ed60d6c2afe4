"""The probe's decision, as pure tensor functions over what the two passes recorded.

Threshold mode (the original GradProbe): a tentatively selected weight is redundant (pruned)
when its gradient statistic after the reduction did not grow by more than
``gradient_threshold``: ``new <= old * (1 + gradient_threshold)``; otherwise it is restored.
The decision depends only on new/old, so one probe serves every threshold of a sweep.

Target mode: rank the tentative weights by that ratio and prune exactly the lowest ones
(per layer, over all layers, or per N:M group), so the requested sparsity is reached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def prune_decision(old: torch.Tensor, new: torch.Tensor, gradient_threshold: float) -> torch.Tensor:
    """True where the weight is redundant (compared in float32)."""
    return new.float() <= old.float() * (1.0 + gradient_threshold)


def gradient_ratio(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """new/old in float32; 0/0 (no gradient either way) counts as 1, x/0 as +inf."""
    old, new = old.float(), new.float()
    safe = torch.where(old > 0, old, torch.ones_like(old))
    return torch.where(old > 0, new / safe, torch.where(new > 0, torch.full_like(new, float("inf")),
                                                        torch.ones_like(new)))


def lowest_in_groups(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the ``n`` lowest scores in every group of ``m`` consecutive entries along the
    last dim of ``scores`` [rows, cols] (ties: lower column first). ``cols % m == 0``."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(rows, cols)


def check_nm(mask: torch.Tensor, n: int, m: int, exact: bool) -> None:
    """Raise ValueError unless every group of ``m`` along the input dim has ``n`` (``exact``)
    or at most ``n`` True entries."""
    counts = mask.reshape(mask.shape[0], -1).reshape(mask.shape[0], -1, m).sum(-1)
    bad = (counts != n) if exact else (counts > n)
    if bool(bad.any()):
        raise ValueError(f"{int(bad.sum())} groups violate the {n}:{m} pattern "
                         f"(counts seen: {sorted(set(counts[bad].tolist()))[:5]})")


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

    def ratio(self) -> torch.Tensor:
        return gradient_ratio(self.old, self.new)

    def threshold_mask(self, gradient_threshold: float) -> torch.Tensor:
        """Full local mask (True = zero this weight) at ``gradient_threshold``."""
        return self.expand(prune_decision(self.old, self.new, gradient_threshold))

    def expand(self, selected: torch.Tensor) -> torch.Tensor:
        """A full local mask from one flag per tentative position."""
        mask = torch.zeros_like(self.tentative)
        mask[self.tentative] = selected.to(mask.device)
        return mask

    def decided_values(self, pruned: torch.Tensor) -> torch.Tensor:
        """Values for the tentative positions: 0 where ``pruned``, the exact original elsewhere."""
        prune = pruned[self.tentative].to(self.originals.device)
        return torch.where(prune, torch.zeros_like(self.originals), self.originals)


@dataclass
class ProbeRecord:
    """Everything the two gradient passes measured, keyed by parameter name."""

    layers: dict[str, LayerProbe]
    #: per Linear layer, H = 2 X X^T of its calibration inputs (only when asked for, to
    #: reconstruct the kept weights after the decision; see ``compensation``)
    hessians: dict[str, torch.Tensor] | None = None

    def masks(self, gradient_threshold: float) -> dict[str, torch.Tensor]:
        return {n: layer.threshold_mask(gradient_threshold) for n, layer in self.layers.items()}
