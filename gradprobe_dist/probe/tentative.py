"""The tentative selection: what a strategy sees inside the probe, the checks on what it
returns, and the per-layer sparsity an allocation gives it (``strategies.allocation``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.strategies.allocation import Allocation, allocate, owl_scores
from gradprobe_dist.strategies.base import PruningStrategy, SelectionContext, transposed_names

log = get_logger(__name__)


def selection_context(backend: Backend, model: nn.Module, owners: dict[str, nn.Module],
                      norms: dict[str, torch.Tensor]) -> SelectionContext:
    """The strategy's view of the prunable weights; ``norms`` (this rank's input-feature
    norms, when collected) are summed over ranks here, in one collective."""
    names = list(owners)
    if norms:  # every rank saw its own micro-batches
        missing = [n for n in names if n not in norms]
        if missing:
            raise ValueError(f"no input reached layer {missing[0]!r} during calibration, so "
                             "its activation norms are unknown; exclude it")
        flat = backend.sum_over_ranks(torch.cat([norms[n].reshape(-1) for n in names]))
        norms = dict(zip(names, flat.split([norms[n].numel() for n in names])))
    return SelectionContext(
        weights={n: backend.local_weight(n) for n in names},
        slices={n: backend.local_slice(n) for n in names},
        backend=backend, input_sq_norms=norms, model=model, transposed=transposed_names(owners))


def select_tentative(strategy: PruningStrategy, backend: Backend, model: nn.Module,
                     owners: dict[str, nn.Module], norms: dict[str, torch.Tensor], sparsity: float,
                     oversample: float, allocation: Allocation | None
                     ) -> tuple[dict[str, torch.Tensor], SelectionContext, dict[str, float] | None]:
    """The strategy's checked masks of ``oversample`` x ``sparsity`` of each layer (capped at 1),
    ``sparsity`` first spread over layers by an ``owl`` allocation from this rank's input
    ``norms``; also the context and the allocated sparsities (None: uniform). With
    ``oversample=1`` they are the strategy's own masks, what target mode decides unvetoed."""
    context = selection_context(backend, model, owners, norms)
    layer_sparsity = None
    if allocation is not None and allocation.kind == "owl":
        layer_sparsity = allocate_layers(allocation, sparsity, owl_scores(
            context.weights, context.slices, context.input_sq_norms, allocation.outlier_factor,
            backend, context.transposed), backend)
    context.layer_sparsity = {n: min(1.0, s * oversample) for n, s in
                              (layer_sparsity or dict.fromkeys(owners, sparsity)).items()}
    masks = checked_masks(strategy, strategy.select(context, min(1.0, sparsity * oversample)),
                          model, backend, list(owners))
    return masks, context, layer_sparsity


def checked_masks(strategy: PruningStrategy, masks, model: nn.Module, backend: Backend,
                  param_names: list[str]) -> dict[str, torch.Tensor]:
    """Validate a strategy's output; masks for non-prunable parameters are ignored, missing
    ones select nothing."""
    name_of = strategy.get_name()
    if not isinstance(masks, dict):
        raise TypeError(f"{name_of}: select_weights_to_prune must return a "
                        f"dict name -> bool mask, got {type(masks).__name__}")
    known = {n for n, _ in model.named_parameters()}
    unknown = sorted(set(masks) - known)
    if unknown:
        raise ValueError(f"strategy {name_of!r} returned masks for unknown "
                         f"parameters {unknown[:5]}: use names from model.named_parameters()")
    ignored = sorted(set(masks) - set(param_names))
    if ignored:
        log.info("ignoring masks for %d non-prunable parameters (e.g. %s); choose prunable "
                 "parameters with include=[...]", len(ignored), ignored[0])
    checked = {}
    for name in param_names:
        w = backend.local_weight(name)
        mask = masks.get(name)
        if mask is None:
            checked[name] = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"strategy {name_of!r} returned a mask of dtype "
                            f"{getattr(mask, 'dtype', type(mask).__name__)} for {name!r}: "
                            "masks must be torch.bool tensors (True = prune)")
        if mask.shape != w.shape:
            raise ValueError(f"strategy {name_of!r} returned a mask of shape "
                             f"{list(mask.shape)} for {name!r}, whose (local) weight has shape "
                             f"{list(w.shape)}")
        checked[name] = mask.to(w.device)
    return checked


def allocate_layers(allocation: Allocation, sparsity: float, scores: dict[str, float],
                    backend: Backend, record: ProbeRecord | None = None) -> dict[str, float]:
    """Layer sparsities from scores; after the probe (``record``) a layer can't exceed what
    it selected."""
    numels = {n: backend.local_slice(n).full_numel for n in scores}
    high = allocation.max_sparsity
    if record is not None:
        tentative = backend.sum_over_shards(torch.tensor(
            [float(l.tentative.count_nonzero()) for l in record.layers.values()], dtype=torch.float64))
        high = min([high] + [float(t) / numels[n] for n, t in zip(record.layers, tentative)])
    if high < sparsity:
        raise ValueError(f"allocation cannot reach sparsity {sparsity}: a layer is capped at "
                         f"{high:.3f}; raise oversample or allocation.max_sparsity")
    return allocate(scores, numels, sparsity, allocation.spread, allocation.min_sparsity, high)


def nm_pattern(strategy: PruningStrategy) -> tuple[int, int] | None:
    """(N, M) when ``strategy`` prunes N of every M consecutive input weights."""
    return getattr(strategy, "nm", None)


def check_allocation(allocation: Allocation | None, mode: str, target_scope: str,
                     strategy: PruningStrategy) -> None:
    if allocation is None or allocation.kind == "uniform":
        return
    if mode == "sparsegpt":
        raise ValueError("mode='sparsegpt' prunes every layer to the same sparsity: use the "
                         "uniform allocation")
    if allocation.kind == "gradient" and mode != "target":
        raise ValueError("allocation kind 'gradient' decides layer sparsities from the probe's "
                         "ratios, so it needs mode='target'")
    if target_scope != "layer" or nm_pattern(strategy) or getattr(strategy, "scope", "layer") != "layer":
        raise ValueError("a per-layer allocation needs per-layer selection: use a layer-scoped "
                         "strategy (not global or N:M) and target_scope='layer'")


def check_pattern(strategy: PruningStrategy, sparsity: float) -> None:
    nm = nm_pattern(strategy)
    if nm and abs(sparsity - nm[0] / nm[1]) > 1e-9:
        raise ValueError(f"strategy {strategy.get_name()} prunes {nm[0]} of every {nm[1]} "
                         f"weights: pass sparsity={nm[0] / nm[1]} (got {sparsity})")
