"""The probe's decision: pure functions of a ``ProbeRecord``, collectives through the backend.

Threshold mode (the original GradProbe): a tentatively selected weight is redundant (pruned)
when its gradient statistic after the reduction did not grow by more than
``gradient_threshold``: ``new <= old * (1 + gradient_threshold)``; otherwise it is restored.
The decision depends only on new/old, so one probe serves every threshold of a sweep.

Target mode reaches the requested sparsity exactly: in the strategy's own order with the
probe's vetoed candidates last (``order``; ``gradprobe_dist.probe.target``), or, for a
strategy that gives no scores, the tentative weights with the lowest ratio (per layer, over
all layers, or per N:M group).

``decide`` returns a ``Decision`` and changes nothing: applying it to the weights is the
engine's job (``gradprobe_dist.probe.engine``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.probe.target import StrategyOrder, in_strategy_order
from gradprobe_dist.probe.validation import check_mode, check_threshold
from gradprobe_dist.strategies.base import choose_per_output, count_to_select

_FLOAT_MAX = torch.finfo(torch.float32).max


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


def candidates_first(ratio: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Scores that rank every candidate by its gradient ratio and every other position after
    all of them, even after a candidate whose ratio is inf."""
    return torch.where(candidate.to(ratio.device), ratio.clamp(max=_FLOAT_MAX),
                       torch.full_like(ratio, float("inf")))


@dataclass(frozen=True)
class Decision:
    """Masks (True = prune; local parts) and what they amount to over all ranks."""

    masks: dict[str, torch.Tensor]
    #: target mode: the gradient_threshold whose threshold-mode decision it matched at worst
    equivalent_threshold: float | None
    #: per layer over all ranks: tentatively selected weights
    tentative: dict[str, int]
    #: per layer over all ranks: pruned weights (the rest of ``tentative`` is restored)
    pruned: dict[str, int]

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned.values())


def decide(record: ProbeRecord, sparsity: float, backend: Backend, *, mode: str = "threshold",
           gradient_threshold: float = 0.0, target_scope: str = "layer",
           order: StrategyOrder | None = None, vetoes: dict[str, torch.Tensor] | None = None) -> Decision:
    """The masks of ``mode`` (see the module docstring) from ``record``, and in target mode
    the strategy's ``order`` with ``vetoes`` (local bool masks, None: no veto) ranked last;
    a collective (every rank calls it with its own record)."""
    check_mode(mode, 1.0, target_scope)
    check_threshold(gradient_threshold)
    if mode == "sparsegpt":
        raise ValueError("mode='sparsegpt' is chosen by SparseGPT while it updates the weights: "
                         "use GradProbe.decide(record, sparsity, mode='sparsegpt')")
    equivalent = None
    if mode == "threshold":
        masks = record.masks(gradient_threshold)
    else:
        ratios = {n: layer.ratio() for n, layer in record.layers.items()}
        if order is not None:
            masks = in_strategy_order(backend, order, {n: l.tentative for n, l in record.layers.items()},
                                      vetoes, sparsity)
        elif record.nm:
            masks = _lowest_per_group(record, ratios, backend)
        else:
            masks = _lowest_overall(record, ratios, sparsity, target_scope, backend)
        equivalent = _equivalent_threshold(record, ratios, masks, backend)
    _check_nm_masks(record, masks, exact=mode == "target")
    return counted(record, masks, backend, equivalent)


def counted(record: ProbeRecord, masks: dict[str, torch.Tensor], backend: Backend,
            equivalent_threshold: float | None = None) -> Decision:
    """``masks`` as a ``Decision``, with their counts over all ranks (a collective)."""
    counts = backend.sum_over_shards(torch.tensor(
        [[int(layer.tentative.count_nonzero()), int(masks[n].count_nonzero())] for n, layer in record.layers.items()],
        dtype=torch.float64).reshape(-1, 2)).long().tolist()
    return Decision(masks, equivalent_threshold, {n: c[0] for n, c in zip(record.layers, counts)},
                    {n: c[1] for n, c in zip(record.layers, counts)})


def _lowest_per_group(record: ProbeRecord, ratios: dict[str, torch.Tensor],
                      backend: Backend) -> dict[str, torch.Tensor]:
    """N of every M input weights, lowest ratio first; non-tentative positions rank last."""
    n, m = record.nm
    masks = {}
    for name, layer in record.layers.items():
        ratio = torch.zeros(layer.tentative.shape, device=layer.old.device)
        ratio[layer.tentative.to(ratio.device)] = ratios[name]
        scores = candidates_first(ratio, layer.tentative)
        mask = choose_per_output(backend, name, record.slices[name], name in record.transposed,
                                 scores, lambda rows: lowest_in_groups(rows, n, m))
        masks[name] = mask.to(layer.tentative.device) & layer.tentative
    return masks


def _lowest_overall(record: ProbeRecord, ratios: dict[str, torch.Tensor], sparsity: float,
                    scope: str, backend: Backend) -> dict[str, torch.Tensor]:
    """Exactly ``sparsity`` of each layer (``scope="layer"``, or its allocated sparsity) or of
    all layers together (``"global"``), lowest ratio first among the tentative weights."""
    tentative = backend.sum_over_shards(torch.tensor(
        [int(layer.tentative.count_nonzero()) for layer in record.layers.values()], dtype=torch.float64))
    numels = [record.slices[n].full_numel for n in record.layers]
    if scope == "global":
        k = min(count_to_select(sum(numels), sparsity), int(tentative.sum()))
        picked = backend.select_smallest(list(ratios.values()), k)
    else:
        per_layer = record.layer_sparsity or dict.fromkeys(record.layers, sparsity)
        ks = [min(count_to_select(numel, per_layer[n]), int(t))
              for n, numel, t in zip(record.layers, numels, tentative)]
        picked = backend.select_smallest_each(list(ratios.values()), ks)
    return {n: layer.expand(p) for (n, layer), p in zip(record.layers.items(), picked)}


def _equivalent_threshold(record: ProbeRecord, ratios: dict[str, torch.Tensor],
                          masks: dict[str, torch.Tensor], backend: Backend) -> float:
    """The smallest gradient_threshold under which threshold mode would prune every weight
    that ``masks`` prunes (the worst ratio pruned, minus 1), over all ranks."""
    worst = max((float(ratios[n][masks[n][layer.tentative]].max())
                 for n, layer in record.layers.items() if masks[n].any()), default=0.0)
    worst = float(backend.all_reduce(torch.tensor([worst], dtype=torch.float64, device=backend.device), "max"))
    return max(0.0, worst - 1.0)


def _check_nm_masks(record: ProbeRecord, masks: dict[str, torch.Tensor], exact: bool) -> None:
    """Every N:M-pruned layer must hold at most (threshold) or exactly (target) N zeros
    per group; flat ZeRO-3 parts cut groups, so those are checked once gathered."""
    if record.nm:
        for name, mask in masks.items():
            if record.slices[name].layout != "flat":
                check_nm(mask, *record.nm, exact=exact)
