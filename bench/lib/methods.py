"""The pruners a benchmark compares GradProbe with, defined once: random, magnitude (per
layer), Wanda (per row), SparseGPT (the library's ``SparseGPT`` pruner, from the dense
model's H or block after block as the reference), a fixed mask with SparseGPT's OBS update
of the kept weights ("reconstruction"), OWL per-layer sparsities, and a random pick among
magnitude's candidates (the control for ranking by gradient ratio).

They prune a model in place from one ``Calibration``: the calibration batches of a seed and
what the dense model's forward over them gives (Wanda's input norms, each Linear layer's
H = 2 X X^T, the same H the probe records for ``reconstruct=True``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn

from gradprobe_dist import Allocation, MagnitudePruning, PruningStrategy, RandomPruning, WandaPruning
from gradprobe_dist.probe.decision import lowest_in_groups
from gradprobe_dist.probe.params import find_prunable
from gradprobe_dist.reconstruct.hessians import collect_input_hessians
from gradprobe_dist.reconstruct.triangle import unpack_symmetric
from gradprobe_dist.reconstruct.obs import reconstruct_with_mask
from gradprobe_dist.reconstruct.pruner import SparseGPT
from gradprobe_dist.strategies import SelectionContext
from gradprobe_dist.strategies.activations import collect_input_sq_norms
from gradprobe_dist.strategies.allocation import allocate, owl_scores
from gradprobe_dist.strategies.base import count_to_select, parse_pattern

#: every baseline ``prune`` knows, with its name in tables
BASELINES = {"random": "random", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
             "sparsegpt_dense_h": "SparseGPT, dense-model H",
             "random_candidates": "random among magnitude candidates"}
#: the GradProbe variants the benchmarks probe with (``make_strategy`` gives their strategy)
GRADPROBE = {"gradprobe_magnitude": "GradProbe+magnitude", "gradprobe_wanda": "GradProbe+Wanda"}
NAMES = {**BASELINES, **GRADPROBE}


@dataclass
class Calibration:
    """One seed's calibration batches and the dense model's statistics over them."""

    seed: int
    batches: list
    input_sq_norms: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]


def calibrate(model: nn.Module, batches: list, seed: int) -> Calibration:
    owners = find_prunable(model)
    with collect_input_sq_norms(owners) as norms, collect_input_hessians(owners) as hessians:
        forward_all(model, batches)
    return Calibration(seed, batches, norms, {name: unpack_symmetric(h) for name, (h, _) in hessians.items()})


def forward_all(model: nn.Module, batches: list) -> None:
    with torch.no_grad():
        for batch in batches:
            forward(model, batch)


def make_strategy(base: str, pattern: str | None = None) -> PruningStrategy:
    """Magnitude (per layer) or Wanda selection, for a baseline or for GradProbe to probe;
    ``base`` names either (``"gradprobe_wanda"`` too)."""
    if base.endswith("magnitude"):
        return MagnitudePruning("layer", pattern=pattern)
    return WandaPruning(pattern=pattern)


def prune(base: str, model: nn.Module, sparsity: float, calibration: Calibration, pattern: str | None = None,
          *, reconstruct: bool = False, allocation: str | None = None, oversample: float | None = None) -> None:
    """Prune ``model`` in place with baseline ``base`` (a key of ``BASELINES``) to ``sparsity``
    of every prunable layer (N of every M with ``pattern``). ``reconstruct``: OBS update of
    the kept weights from the dense model's H; ``allocation="owl"``: OWL's per-layer
    sparsities; ``oversample``: the candidate share of ``random_candidates``."""
    owners = find_prunable(model)
    params = dict(model.named_parameters())
    if base == "sparsegpt":
        sparsegpt_block_after_block(model, calibration.batches, sparsity, pattern)
        return
    if base == "sparsegpt_dense_h":
        SparseGPT(model, pattern=pattern).prune_from(calibration.hessians, sparsity)
        return
    context = SelectionContext.for_model(model, list(owners))
    context.input_sq_norms = calibration.input_sq_norms
    if allocation == "owl":
        context.layer_sparsity = owl_layer_sparsity(context, sparsity)
    if base == "random_candidates":
        masks = random_among_candidates(context, sparsity, oversample, calibration.seed, pattern)
    elif base == "random":
        masks = RandomPruning(seed=calibration.seed).select(context, sparsity)
    else:
        masks = make_strategy(base, pattern).select(context, sparsity)
    with torch.no_grad():
        for name, mask in masks.items():
            if reconstruct:
                params[name].copy_(reconstruct_with_mask(params[name], calibration.hessians[name], mask))
            else:
                params[name].masked_fill_(mask, 0.0)


def random_among_candidates(context: SelectionContext, sparsity: float, oversample: float, seed: int,
                            pattern: str | None) -> dict[str, torch.Tensor]:
    """Of magnitude's ``oversample`` x ``sparsity`` candidates (what GradProbe+magnitude
    probes), a seeded random ``sparsity`` per layer (N of every M with ``pattern``) instead of
    the lowest gradient ratios."""
    candidates = make_strategy("magnitude", pattern).select(context, min(1.0, sparsity * oversample))
    gen = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(c.shape, generator=gen).masked_fill(~c, 2.0) for name, c in candidates.items()}
    if pattern:
        n, m = parse_pattern(pattern)
        return {name: lowest_in_groups(s.reshape(s.shape[0], -1), n, m).reshape(s.shape) for name, s in scores.items()}
    counts = {name: count_to_select(s.numel(), sparsity) for name, s in scores.items()}
    return context.select_smallest_each(scores, counts)


def owl_layer_sparsity(context: SelectionContext, sparsity: float) -> dict[str, float]:
    """OWL's per-layer sparsities from the dense model's Wanda scores, computed as the probe
    does for ``Allocation("owl")`` (the library has no public call for it without a probe)."""
    owl = Allocation("owl")
    scores = owl_scores(context.weights, context.slices, context.input_sq_norms, owl.outlier_factor,
                        context.backend, context.transposed)
    numels = {name: where.full_numel for name, where in context.slices.items()}
    return allocate(scores, numels, sparsity, owl.spread, owl.min_sparsity, owl.max_sparsity)


def sparsegpt_block_after_block(model: nn.Module, batches: list, sparsity: float, pattern: str | None) -> None:
    """SparseGPT as the reference runs it on transformers: the layers sharing a
    ``prefix.<index>`` name (one transformer block, one MLP layer) pruned together, from
    Hessians of a forward whose inputs already pass through the pruned earlier blocks."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in find_prunable(model):
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 2)
        blocks[".".join(parts[:index + 1])].append(name)
    for names in blocks.values():
        SparseGPT(model, pattern=pattern, include=names).prune(batches, sparsity, len(batches), compute_loss=forward)


def forward(model: nn.Module, batch):
    """One calibration batch through ``model`` (a dict batch is an LM's keyword arguments)."""
    return model(**batch) if isinstance(batch, dict) else model(batch[0])
