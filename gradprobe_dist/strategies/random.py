"""Random selection: the control every informed strategy must beat."""
from __future__ import annotations

import torch
import torch.nn as nn

from gradprobe_dist.strategies.base import ScoredStrategy, SelectionContext, count_to_select, local_part


class RandomPruning(ScoredStrategy):
    """Exactly floor(sparsity * numel) weights per layer, uniformly at random.

    Scores are drawn for the full weight from a generator seeded by ``seed`` and the layer's
    position, then cut to the local part, so every parallel mode selects the same weights.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def get_name(self) -> str:
        return f"random_seed{self.seed}"

    def select_weights_to_prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        return self.select(SelectionContext.for_model(model), sparsity)

    def scores(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        scores = {}
        for index, (name, where) in enumerate(context.slices.items()):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            full = torch.rand(where.full_shape, generator=gen)
            scores[name] = local_part(full, where).to(context.weights[name].device)
        return scores

    def select_lowest(self, context: SelectionContext, scores: dict[str, torch.Tensor],
                      sparsity: float) -> dict[str, torch.Tensor]:
        ks = {n: count_to_select(context.slices[n].full_numel, context.sparsity_of(n, sparsity)) for n in scores}
        return context.select_smallest_each(scores, ks)
