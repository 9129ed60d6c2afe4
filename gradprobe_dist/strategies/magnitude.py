"""Magnitude pruning: the smallest |w|, per layer or across all prunable layers."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import PruningStrategy, SelectionContext, count_to_select

SCOPES = ("layer", "global")


class MagnitudePruning(PruningStrategy):
    """Select the ``sparsity`` fraction of smallest-magnitude weights.

    ``scope="layer"``: exactly floor(sparsity * numel) in every layer;
    ``scope="global"``: exactly floor(sparsity * total) over all prunable weights together.
    Ties are broken by model order, then position, identically in every parallel mode.
    """

    def __init__(self, scope: str = "layer"):
        if scope not in SCOPES:
            raise ValueError(f"MagnitudePruning scope={scope!r} is unknown: use 'layer' or 'global'")
        self.scope = scope

    def get_name(self) -> str:
        return f"magnitude_{self.scope}"

    def select_weights_to_prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        return self.select(SelectionContext.for_model(model), sparsity)

    def select(self, context: SelectionContext, sparsity: float) -> dict[str, torch.Tensor]:
        scores = {n: w.detach().abs() for n, w in context.weights.items()}
        if self.scope == "global":
            total = sum(s.full_numel for s in context.slices.values())
            return context.select_smallest(scores, count_to_select(total, sparsity))
        ks = {n: count_to_select(context.slices[n].full_numel, sparsity) for n in scores}
        return context.select_smallest_each(scores, ks)
