"""The probe as a veto: which candidates SparseGPT (or, in target mode, the strategy's own
order, ``probe.target``) should keep if it can.

``mode="sparsegpt"`` lets SparseGPT choose the mask (its own order, its own quota per column
block or N:M group) and gives it one extra fact per probed candidate: did the weight's
gradient grow when the probe scaled it down? A vetoed weight ranks after every unvetoed one
(``reconstruct.sparsegpt``), so the probe can only move SparseGPT's choice to the next-best
weights in SparseGPT's order, never replace that order by the noisy ratio alone.

Vetoed: the candidates whose gradient ratio new/old exceeds ``1 + gradient_threshold`` (what
threshold mode would restore), or, with ``fraction``, the ``fraction`` of each layer's
candidates with the highest ratios (exact over all ranks; ``score`` ranks them by another
per-candidate measure, as ``bench.loss_change`` does with ``probe.estimate``'s estimates).
Weights the strategy did not select carry no measurement and are never vetoed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.parallel.select import selection_groups
from gradprobe_dist.probe.record import LayerProbe, ProbeRecord, prune_decision
from gradprobe_dist.probe.validation import is_number
from gradprobe_dist.reconstruct.layers import sparsegpt_masks
from gradprobe_dist.strategies.base import count_to_select

_FLOAT_MAX = torch.finfo(torch.float32).max


def check_fraction(fraction: float | None) -> None:
    if fraction is None:
        return
    if not is_number(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"veto_fraction={fraction!r} must be a number in [0, 1] (the share of each "
                         "layer's candidates with the highest gradient ratio that SparseGPT keeps), "
                         "or None to veto by gradient_threshold")


def probe_vetoes(backend: Backend, record: ProbeRecord, gradient_threshold: float = 0.0,
                 fraction: float | None = None,
                 score: Callable[[LayerProbe], torch.Tensor] = LayerProbe.ratio) -> dict[str, torch.Tensor]:
    """Local bool masks (True = vetoed) per probed weight; a collective with ``fraction``,
    which vetoes each layer's highest ``score(layer)`` (per candidate; the gradient ratio).
    Without ``fraction`` the ratio's threshold rule decides and ``score`` is not read."""
    check_fraction(fraction)
    if fraction is None:
        return {n: layer.expand(~prune_decision(layer.old, layer.new, gradient_threshold))
                for n, layer in record.layers.items()}
    names = list(record.layers)
    candidates = [int(c) for c in backend.sum_over_shards(torch.tensor(
        [float(record.layers[n].tentative.count_nonzero()) for n in names], dtype=torch.float64)).tolist()]
    vetoes = {}
    # group by group (the same groups on every rank): the float32 scores of all candidates at
    # once were one of the whole job's highest points of memory in bfloat16
    for group in selection_groups(candidates):
        highest_first = [-score(record.layers[names[i]]).clamp(min=-_FLOAT_MAX, max=_FLOAT_MAX) for i in group]
        picked = backend.select_smallest_each(highest_first, [count_to_select(candidates[i], fraction)
                                                              for i in group])
        vetoes.update({names[i]: record.layers[names[i]].expand(p) for i, p in zip(group, picked)})
    return {n: vetoes[n] for n in names}


def sparsegpt_with_veto(backend: Backend, record: ProbeRecord, sparsity: float, gradient_threshold: float,
                        fraction: float | None, reconstruct: bool, veto: bool = True) -> dict[str, torch.Tensor]:
    """``mode="sparsegpt"``: SparseGPT's masks with the probe's veto (``veto=False``: plain
    SparseGPT on the same Hessians); SparseGPT updates the kept weights itself (a collective)."""
    if reconstruct:
        raise ValueError("mode='sparsegpt' updates the kept weights itself: drop reconstruct=True")
    missing = [n for n in record.layers if n not in (record.hessians or {})]
    if missing:
        raise ValueError(f"mode='sparsegpt' needs the input Hessian of every probed layer "
                         f"(probe(..., hessians=True), Linear layers only); {missing[0]!r} has none")
    # handed over without a name here, so the sweep frees each veto once its layer is done
    return sparsegpt_masks(backend, record.hessians, sparsity, nm=record.nm,
                           vetoes=probe_vetoes(backend, record, gradient_threshold, fraction) if veto else None,
                           transposed=record.transposed)
