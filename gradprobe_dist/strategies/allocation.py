"""Per-layer sparsity allocation: prune robust layers harder than sensitive ones.

Uniform pruning gives every layer the same sparsity. Layers differ: OWL (Yin et al., 2024)
keeps more of layers whose Wanda scores have many outliers; the probe itself measures, per
layer, the fraction of tentatively selected weights whose gradient did not grow (redundant
weights). Both become a per-layer score (higher = more prunable); ``allocate`` maps scores
to sparsities spread over ``[target - spread, target + spread]`` (clipped to the layer
bounds), shifted so that the parameter-weighted mean is exactly the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("uniform", "owl", "gradient")


@dataclass(frozen=True)
class Allocation:
    """How to split a global sparsity target over layers."""

    kind: str = "uniform"
    #: half-width of the spread of layer sparsities around the target (OWL's lambda)
    spread: float = 0.08
    min_sparsity: float = 0.0
    max_sparsity: float = 0.95
    #: OWL: a score counts as an outlier above ``outlier_factor`` x the layer's mean score
    outlier_factor: float = 5.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"allocation kind={self.kind!r} is unknown: choose {', '.join(KINDS)}")
        if not 0.0 <= self.min_sparsity <= self.max_sparsity < 1.0:
            raise ValueError(f"allocation bounds [{self.min_sparsity}, {self.max_sparsity}] must satisfy "
                             "0 <= min_sparsity <= max_sparsity < 1")
        if self.spread < 0:
            raise ValueError(f"allocation spread={self.spread} must be >= 0")


def allocate(scores: dict[str, float], numels: dict[str, int], target: float,
             spread: float, low: float = 0.0, high: float = 0.95) -> dict[str, float]:
    """Layer sparsities: higher score -> higher sparsity, numel-weighted mean == target.

    Scores are min-max normalised to [-spread, +spread] around an offset found by bisection
    (the weighted mean is monotone in it), each clipped to [low, high].
    """
    if not low <= target <= high:
        raise ValueError(f"target sparsity {target} is outside the layer bounds [{low}, {high}]")
    names = list(scores)
    s = torch.tensor([scores[n] for n in names], dtype=torch.float64)
    w = torch.tensor([numels[n] for n in names], dtype=torch.float64)
    span = float(s.max() - s.min())
    z = (s - s.min()) / span * 2 - 1 if span > 0 else torch.zeros_like(s)
    lo, hi = -1.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        mean = float(((mid + spread * z).clamp(low, high) * w).sum() / w.sum())
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    values = (hi + spread * z).clamp(low, high)
    return dict(zip(names, values.tolist()))


def owl_scores(weights: dict[str, torch.Tensor], slices: dict, input_sq_norms: dict[str, torch.Tensor],
               outlier_factor: float, backend, transposed: frozenset[str] = frozenset()) -> dict[str, float]:
    """Minus each layer's outlier ratio of Wanda scores (fewer outliers -> more prunable):
    the share of scores above ``outlier_factor`` x the layer mean; sums run over every
    rank's shard so each rank gets the same numbers."""
    from gradprobe_dist.strategies.wanda import wanda_scores

    scores = {n: wanda_scores(w, input_sq_norms[n], slices[n], n in transposed).reshape(-1)
              for n, w in weights.items()}
    sums = backend.sum_over_shards(torch.tensor([[float(s.sum()), s.numel()] for s in scores.values()],
                                                dtype=torch.float64))
    means = sums[:, 0] / sums[:, 1].clamp(min=1)
    outliers = backend.sum_over_shards(torch.tensor(
        [float((s > outlier_factor * float(m)).count_nonzero()) for s, m in zip(scores.values(), means)],
        dtype=torch.float64))
    return {n: -float(o / max(float(t), 1.0)) for n, o, t in zip(scores, outliers, sums[:, 1])}


def redundancy_scores(record, backend) -> dict[str, float]:
    """Per layer, the fraction of tentatively selected weights whose gradient did not grow."""
    counts = torch.tensor([[float((layer.ratio() <= 1.0).count_nonzero()), float(layer.tentative.count_nonzero())]
                           for layer in record.layers.values()], dtype=torch.float64)
    counts = backend.sum_over_shards(counts)
    return {n: float(c[0] / max(float(c[1]), 1.0)) for n, c in zip(record.layers, counts)}
