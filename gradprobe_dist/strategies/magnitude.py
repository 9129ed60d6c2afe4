"""Magnitude pruning: the smallest |w|, per layer, across all layers, or per N:M group."""
from __future__ import annotations

import torch
import torch.nn as nn

from gradprobe_dist.probe.decision import lowest_in_groups
from gradprobe_dist.strategies.base import ScoredStrategy, SelectionContext, check_nm_shape, count_to_select, parse_pattern

SCOPES = ("layer", "global")


class MagnitudePruning(ScoredStrategy):
    """Select the ``sparsity`` fraction of smallest-magnitude weights.

    ``scope="layer"``: exactly floor(sparsity * numel) in every layer;
    ``scope="global"``: exactly floor(sparsity * total) over all prunable weights together.
    ``pattern="N:M"``: in every group of M consecutive input weights of a row, the
    floor(sparsity * M) smallest (N of M when sparsity = N/M; more when the probe oversamples).
    Ties are broken by model order, then position, identically in every parallel mode.
    """

    def __init__(self, scope: str = "layer", pattern: str | None = None):
        if scope not in SCOPES:
            raise ValueError(f"MagnitudePruning scope={scope!r} is unknown: use 'layer' or 'global'")
        self.scope = scope
        self.nm = parse_pattern(pattern)

    def get_name(self) -> str:
        return f"magnitude_{self.nm[0]}:{self.nm[1]}" if self.nm else f"magnitude_{self.scope}"

    def select_weights_to_prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        return self.select(SelectionContext.for_model(model), sparsity)

    def scores(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        return {n: w.detach().abs() for n, w in context.weights.items()}

    def select_lowest(self, context: SelectionContext, scores: dict[str, torch.Tensor],
                      sparsity: float) -> dict[str, torch.Tensor]:
        if self.nm:
            m = self.nm[1]
            k = count_to_select(m, sparsity)
            for name in context.slices:
                check_nm_shape(context, name, m)
            return {n: context.select_in_rows(n, s, lambda rows: lowest_in_groups(rows, k, m))
                    for n, s in scores.items()}
        if self.scope == "global":
            total = sum(s.full_numel for s in context.slices.values())
            return context.select_smallest(scores, count_to_select(total, sparsity))
        ks = {n: count_to_select(context.slices[n].full_numel, context.sparsity_of(n, sparsity)) for n in scores}
        return context.select_smallest_each(scores, ks)
