"""GradProbe: prune the weights whose gradient does not fight back when they shrink.

1. Baseline pass: ``num_batches`` calibration batches, forward + backward; fold each
   prunable weight's (rank-averaged) gradient into a statistic.
2. The strategy tentatively selects ``sparsity`` of the weights.
3. Selected weights are scaled to ``reduction_factor`` x value (their originals saved).
4. The same batches, replayed in the same order, give the statistic again.
5. A selected weight is pruned (exactly 0) if ``new <= old * (1 + gradient_threshold)``,
   otherwise restored bit-exactly from the saved original. Unselected weights never change.

This module is the user-facing facade; the passes are ``engine``, the tentative selection
``tentative``, the decision ``decision`` (pure), over a backend from ``gradprobe_dist.parallel``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from gradprobe_dist.checkpoint.masks import pack_local, unpack_local
from gradprobe_dist.masking import MaskHooks, keep_pruned
from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe import stats as statistics
from gradprobe_dist.probe.batches import LossOfBatch, make_loss_of_batch, take_batches
from gradprobe_dist.probe.decision import Decision, counted, decide
from gradprobe_dist.probe.engine import Baseline, ProbeEngine
from gradprobe_dist.probe.guard import guarded, scored_batches
from gradprobe_dist.probe.params import find_prunable
from gradprobe_dist.probe.prefix import FrozenPrefix
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.probe.target import StrategyOrder, in_strategy_order
from gradprobe_dist.probe.tentative import (allocate_layers, check_allocation, check_pattern, nm_pattern,
                                            select_tentative, selection_context)
from gradprobe_dist.probe.validation import (check_guard, check_mode, check_prune_args, check_selection_args,
                                             check_threshold)
from gradprobe_dist.probe.veto import check_fraction, probe_vetoes, sparsegpt_with_veto
from gradprobe_dist.reconstruct.apply import compensate, reconstruct_from
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.strategies.allocation import Allocation, redundancy_scores
from gradprobe_dist.strategies.base import PruningStrategy, ScoredStrategy

log = get_logger(__name__)


class GradProbe:
    """Gradient-probing pruner for any ``nn.Module``.

    ``backend`` chooses the parallel mode (default: one process on ``device``).
    ``statistic``: ``"max_abs"`` (default, as the original), ``"mean_abs"`` or ``"rms"``.
    ``stat_dtype``/``stat_device``: precision and placement of the statistic (e.g.
    ``torch.bfloat16`` or ``"cpu"`` to save accelerator memory; ``max_abs`` of bf16/fp16
    gradients stays in their dtype, where it is exact). ``include``/``exclude``:
    fnmatch patterns narrowing the prunable parameters; ``extra_prunable``: patterns of other
    parameters to prune as well (see ``gradprobe_dist.probe.params``).
    ``cache_prefix``: run the blocks before the first probed block once per batch, not once
    per pass, keeping their output on ``prefix_cache_device`` (``"same"`` or ``"cpu"``; see
    ``gradprobe_dist.probe.prefix``).
    """

    def __init__(self, model: nn.Module, strategy: PruningStrategy, device=None, *,
                 backend: Backend | None = None, statistic: str = "max_abs",
                 stat_dtype: torch.dtype = torch.float32, stat_device=None,
                 include: list[str] | None = None, exclude: list[str] | None = None,
                 extra_prunable: list[str] | None = None, cache_prefix: bool = True,
                 prefix_cache_device: str = "same"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(strategy, PruningStrategy):
            raise TypeError(f"strategy must be a PruningStrategy, got {type(strategy).__name__}")
        statistics.check_statistic(statistic)
        if stat_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"stat_dtype={stat_dtype} is not a float dtype: use torch.float32, "
                             "torch.bfloat16 or torch.float16")
        self.model = model
        self.strategy = strategy
        self.backend = backend if backend is not None else LocalBackend(device=device or "cpu")
        self.device = self.backend.device
        self.statistic = statistic
        self.stat_dtype = stat_dtype
        self.owners = find_prunable(model, include, exclude, extra_prunable)
        self.param_names = list(self.owners)
        prefix = FrozenPrefix(model, self.param_names, enabled=cache_prefix, device=prefix_cache_device)
        self.engine = ProbeEngine(model, self.backend, self.param_names, statistic, stat_dtype,
                                  torch.device(stat_device) if stat_device is not None else None, prefix)
        # results of the last prune/decide/probe, for users; nothing here feeds a later call
        self.masks: dict[str, torch.Tensor] = {}
        #: target mode: the gradient_threshold whose threshold-mode decision it matched at worst
        self.equivalent_threshold: float | None = None
        #: sparsity per layer when an allocation spread the target unevenly
        self.layer_sparsity: dict[str, float] | None = None
        #: after a guarded decision: which masks were kept and both calibration losses
        self.guard_report: dict | None = None
        self._mask_hooks: MaskHooks | None = None

    # -- public API --------------------------------------------------------------------------
    def prune(self, dataloader: Iterable, loss_fn: Callable | None = None, sparsity: float = 0.5,
              num_batches: int = 10, reduction_factor: float = 0.1,
              gradient_threshold: float = 0.0, verbose: bool = False, *,
              compute_loss: LossOfBatch | None = None, mode: str = "threshold",
              oversample: float = 1.5, target_scope: str = "layer",
              allocation: Allocation | None = None, reconstruct: bool = False,
              veto_fraction: float | None = None, guard: bool = False,
              guard_batches: Iterable | None = None) -> dict[str, torch.Tensor]:
        """Probe and prune in place; returns masks (True = pruned) keyed by parameter name.

        ``mode="threshold"`` (the original): prune the selected weights whose gradient did not
        grow by more than ``gradient_threshold``; the result ends at or below ``sparsity``.
        ``mode="target"``: select ``oversample`` x ``sparsity`` tentatively and prune exactly
        ``sparsity`` in the strategy's own order and by its own rule (per row for Wanda, per
        layer or global for magnitude, per N:M group), the candidates the probe vetoes ranked
        after every other candidate (``gradprobe_dist.probe.target``; vetoed as in
        ``mode="sparsegpt"`` below; ``veto_fraction=0`` gives the strategy's masks exactly).
        A strategy that gives no scores (not a ``ScoredStrategy``: most user strategies)
        falls back to pruning the candidates with the lowest gradient ratio new/old, per layer
        (``target_scope="layer"``), over all layers (``"global"``), or N of every M;
        ``self.equivalent_threshold`` says which threshold the pruned ratios reached.
        ``allocation`` spreads ``sparsity`` unevenly over layers (``gradprobe_dist.strategies.allocation``:
        ``owl`` from activation outliers, ``gradient`` from the probe's own redundancy
        measurements, the latter in target mode only); ``self.layer_sparsity`` records it.
        ``reconstruct=True`` then updates the kept weights of every Linear layer with
        SparseGPT's OBS update, the mask held fixed (``gradprobe_dist.reconstruct.apply``).
        ``mode="sparsegpt"``: SparseGPT chooses exactly ``sparsity`` (or N:M) and updates the
        kept weights, with the probe as a veto: of the ``oversample`` x ``sparsity``
        candidates, those whose gradient ratio exceeds ``1 + gradient_threshold`` (or, with
        ``veto_fraction``, that share of each layer's candidates with the highest ratios) are
        pruned only when SparseGPT's quota cannot be met without them
        (``gradprobe_dist.probe.veto``). ``guard=True`` also decides without the probe (the
        strategy's own masks: in threshold mode at the sparsity the probe's decision reached;
        plain SparseGPT) and keeps whichever has the lower calibration loss
        (``decide_guarded``), measured on
        ``guard_batches`` when given (calibration batches the probe does not use: the rounds
        of ``iterative_prune`` fit the probe's own batches), else on the probe's batches.
        Masks have the local shape of each weight (the full shape unless the backend shards).
        ``compute_loss(model, batch) -> loss`` replaces the default batch handling.
        """
        check_prune_args(sparsity, num_batches, reduction_factor, gradient_threshold)
        check_mode(mode, oversample, target_scope)
        check_fraction(veto_fraction)
        check_pattern(self.strategy, sparsity)
        check_allocation(allocation, mode, target_scope, self.strategy)
        if guard:
            check_guard(mode, self.strategy.get_name(), isinstance(self.strategy, ScoredStrategy),
                        nm_pattern(self.strategy))
        batches = take_batches(dataloader, num_batches)
        scored = scored_batches(guard, guard_batches, batches)
        record = self.probe(batches, loss_fn, sparsity, num_batches, reduction_factor,
                            verbose, compute_loss=compute_loss, allocation=allocation,
                            oversample=oversample if mode in ("target", "sparsegpt") else 1.0,
                            hessians=reconstruct or mode == "sparsegpt")
        options = dict(mode=mode, gradient_threshold=gradient_threshold, target_scope=target_scope,
                       reconstruct=reconstruct, veto_fraction=veto_fraction)
        decision = _guarded(self, record, sparsity, scored, make_loss_of_batch(loss_fn, compute_loss),
                            keep_hessians=False, **options) \
            if guard else _decide(self, record, sparsity, **options)
        if verbose:
            _report(self, decision, sparsity)
        return self.masks

    def prune_by_strategy(self, dataloader: Iterable, loss_fn: Callable | None = None, sparsity: float = 0.5,
                          num_batches: int = 10, verbose: bool = False, *,
                          compute_loss: LossOfBatch | None = None, allocation: Allocation | None = None,
                          reconstruct: bool = False) -> dict[str, torch.Tensor]:
        """Prune in place with the strategy alone, exactly ``sparsity`` by its own rule: for a
        ``ScoredStrategy`` the masks (and weights) of ``prune(mode="target", veto_fraction=0)``,
        without its two gradient passes, whose measurement no veto would read. No backward:
        one forward pass over the batches when the strategy (Wanda), an ``owl`` allocation or
        ``reconstruct`` needs the calibration inputs, none otherwise (magnitude, random).
        A ``gradient`` allocation is the probe's measurement: use ``prune`` for it."""
        return _by_strategy(self, dataloader, make_loss_of_batch(loss_fn, compute_loss), sparsity,
                            num_batches, verbose, allocation, reconstruct)

    def decide(self, record: ProbeRecord, sparsity: float, *, mode: str = "threshold",
               gradient_threshold: float = 0.0, target_scope: str = "layer",
               reconstruct: bool = False, veto_fraction: float | None = None,
               veto: bool = True) -> dict[str, torch.Tensor]:
        """Turn a probe's record into masks and apply them (see ``prune`` for the options);
        the pipeline calls ``probe`` and ``decide`` separately to checkpoint in between.
        ``veto=False``: the decision without the probe, what ``decide_guarded`` compares
        against: the strategy's own masks (in threshold mode at the overall sparsity the
        threshold decision reached), plain SparseGPT.
        The pure decision is ``gradprobe_dist.probe.decision.decide``."""
        return _decide(self, record, sparsity, mode=mode, gradient_threshold=gradient_threshold,
                            target_scope=target_scope, reconstruct=reconstruct,
                            veto_fraction=veto_fraction, veto=veto).masks

    def decide_guarded(self, record: ProbeRecord, sparsity: float, batches: list,
                       loss_fn: Callable | None = None, *, compute_loss: LossOfBatch | None = None,
                       keep_hessians: bool = True, **options) -> dict[str, torch.Tensor]:
        """``decide`` with the probe's veto and without it; keep the masks (and updated
        weights) with the lower mean calibration loss over ``batches`` (forward only: the
        probe's own batches or calibration batches held out from it, no evaluation data), the
        veto's only when lower by more than two standard errors (``probe.guard.probe_wins``).
        ``self.guard_report`` says which won. Threshold mode compares with the strategy at
        the sparsity the threshold decision reached (a scored strategy without N:M pattern).
        ``keep_hessians=False`` drops the record's Hessians once both decisions are made, so
        the guard's forward passes run without them (the record cannot be decided again in
        sparsegpt mode or with ``reconstruct``)."""
        return _guarded(self, record, sparsity, batches, make_loss_of_batch(loss_fn, compute_loss),
                        keep_hessians=keep_hessians, **options).masks

    def target_order(self, record: ProbeRecord, *, gradient_threshold: float = 0.0,
                     veto_fraction: float | None = None, veto: bool = True
                     ) -> tuple[StrategyOrder | None, dict[str, torch.Tensor] | None]:
        """What target mode decides from besides the ratios: the strategy's order of the
        original weights (undoing an earlier decision) and the probe's vetoes (None with
        ``veto=False``); ``(None, None)`` for a strategy without scores, whose candidates
        the ratio alone ranks. Iterative rounds call it once per round."""
        if not isinstance(self.strategy, ScoredStrategy):
            return None, None
        order = _strategy_order(self, record)
        return order, probe_vetoes(self.backend, record, gradient_threshold, veto_fraction) if veto else None

    def sweep_gradient_thresholds(self, dataloader: Iterable, loss_fn: Callable | None,
                                  eval_fn: Callable[[nn.Module], float], sparsity: float = 0.5,
                                  thresholds: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.5),
                                  num_batches: int = 10, verbose: bool = False, *,
                                  reduction_factor: float = 0.1,
                                  compute_loss: LossOfBatch | None = None) -> dict[str, list]:
        """One probe, then every threshold decided from the stored statistics and evaluated.

        Returns ``{'thresholds', 'sparsities', 'weights_pruned', 'metrics'}``; the model is
        left exactly as it was before the sweep.
        """
        check_prune_args(sparsity, num_batches, reduction_factor, 0.0)
        thresholds = list(thresholds)
        if not thresholds:
            raise ValueError("thresholds is empty: pass e.g. [0.0, 0.1, 0.2]")
        for t in thresholds:
            check_threshold(t)
        record = self.probe(dataloader, loss_fn, sparsity, num_batches, reduction_factor,
                            verbose, compute_loss=compute_loss)
        results = {"thresholds": thresholds, "sparsities": [], "weights_pruned": [], "metrics": []}
        try:
            for t in thresholds:
                decision = decide(record, sparsity, self.backend, gradient_threshold=t)
                self.engine.apply_masks(record.layers, decision.masks)
                results["weights_pruned"].append(decision.total_pruned)
                results["sparsities"].append(self.get_sparsity())
                results["metrics"].append(eval_fn(self.model))
                self.engine.restore(record.layers)
                if verbose and self.backend.is_main:
                    log.info("threshold %.4g: sparsity %.2f%%, metric %s", t,
                             100 * results["sparsities"][-1], results["metrics"][-1])
        finally:
            self.engine.restore(record.layers)
        return results

    def get_sparsity(self) -> float:
        """Fraction of exactly-zero entries over all prunable weights (all ranks)."""
        self.engine.ensure_prepared()
        counts = torch.zeros(2, dtype=torch.float64)
        for name in self.param_names:
            w = self.backend.local_weight(name)
            counts[0] += int((w == 0).count_nonzero())
            counts[1] += w.numel()
        counts = self.backend.sum_over_shards(counts)
        return float(counts[0] / counts[1]) if counts[1] else 0.0

    def apply_mask_permanently(self) -> None:
        """Zero the pruned weights and keep them zero through later training.

        Installs a gradient hook and a forward pre-hook per pruned weight (see
        ``gradprobe_dist.masking``); ``remove_mask_hooks()`` takes them off. Under sharded
        backends the weights are zeroed on their shards but no training hooks are added:
        apply the saved masks in your training framework.
        """
        if not self.masks:
            raise ValueError("no masks yet: call prune() before apply_mask_permanently()")
        if self.backend.replicated:
            self.remove_mask_hooks()
            params = dict(self.model.named_parameters())
            self._mask_hooks = keep_pruned(params, self.owners, self.masks)
        else:
            self.engine.zero(self.masks)

    def remove_mask_hooks(self) -> None:
        if self._mask_hooks is not None:
            self._mask_hooks.remove()
            self._mask_hooks = None

    # -- the probe ---------------------------------------------------------------------------
    def probe(self, dataloader: Iterable, loss_fn: Callable | None, sparsity: float,
              num_batches: int, reduction_factor: float, verbose: bool = False, *,
              compute_loss: LossOfBatch | None = None, oversample: float = 1.0,
              allocation: Allocation | None = None, hessians: bool = False,
              signed_gradients: bool = False) -> ProbeRecord:
        """Run both gradient passes; return what they measured. The weights end unchanged.

        The strategy tentatively selects ``oversample`` x ``sparsity`` of each layer (capped at
        1), with ``sparsity`` spread over layers by an ``owl`` allocation; a ``gradient``
        allocation is computed after the passes. Either is kept in the record's (and
        ``self``'s) ``layer_sparsity``.
        ``hessians=True`` also records each Linear layer's input Hessian (for reconstruction);
        ``signed_gradients=True`` the candidates' signed mean gradients in both passes (for the
        loss-change estimates of ``gradprobe_dist.probe.estimate``).
        """
        check_prune_args(sparsity, num_batches, reduction_factor, 0.0)
        if sparsity * oversample >= 1.0 and self.backend.is_main:
            log.warning("oversample x sparsity = %.2f >= 1: every weight becomes a candidate and "
                        "the whole model is scaled down during the probe, which blurs the gradient "
                        "ratios; lower oversample", sparsity * oversample)
        self.layer_sparsity = None
        batches = take_batches(dataloader, num_batches)
        loss_of = make_loss_of_batch(loss_fn, compute_loss)
        owl = allocation is not None and allocation.kind == "owl"
        with self.engine.session() as engine:
            baseline = engine.baseline(
                batches, loss_of, verbose, norms_of=self.owners if self.strategy.needs_activations or owl else {},
                hessians_of=self.owners if hessians else None, signed=signed_gradients)
            tentative, context, layer_sparsity = select_tentative(
                self.strategy, self.backend, self.model, self.owners, baseline.input_sq_norms, sparsity,
                oversample, allocation)
            layers, reduced_loss = engine.reduced(batches, loss_of, tentative, baseline, reduction_factor, verbose)
        record = ProbeRecord(layers, context.slices, baseline.hessians, layer_sparsity,
                             nm_pattern(self.strategy), context.transposed, context.input_sq_norms,
                             reduction_factor, (baseline.loss, reduced_loss))
        if verbose and self.backend.is_main:
            log.info("probe: mean calibration loss %.4f, %.4f with the candidates scaled to %g x",
                     baseline.loss, reduced_loss, reduction_factor)
        if allocation is not None and allocation.kind == "gradient":
            record = dataclasses.replace(record, layer_sparsity=allocate_layers(
                allocation, sparsity, redundancy_scores(record, self.backend), self.backend, record))
        self.layer_sparsity = record.layer_sparsity
        return record

    def apply_decisions(self, record: ProbeRecord, gradient_threshold: float) -> dict[str, torch.Tensor]:
        """Threshold mode: zero the redundant selected weights, restore the others exactly."""
        return self.apply_masks(record, record.masks(gradient_threshold))

    def apply_masks(self, record: ProbeRecord, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zero ``masks`` (within the tentative sets), restore the other candidates bit-exactly."""
        self.engine.apply_masks(record.layers, masks)
        return masks


def _guarded(probe: GradProbe, record: ProbeRecord, sparsity: float, batches: list, loss_of: LossOfBatch,
             keep_hessians: bool = True, **options) -> Decision:
    """``decide_guarded``'s work: both decisions, the one with the lower calibration loss kept."""
    mode = options.pop("mode", "threshold")
    options.pop("veto", None)
    check_guard(mode, probe.strategy.get_name(), isinstance(probe.strategy, ScoredStrategy), record.nm)
    updates_weights = mode == "sparsegpt" or options.get("reconstruct", False)

    def decide_packed(veto: bool) -> Decision:
        """A decision whose masks wait packed, one bit per weight on the CPU, while the guard
        scores both: a bool mask is one byte per weight whatever the model's dtype."""
        decision = _decide(probe, record, sparsity, mode=mode, veto=veto, **options)
        probe.masks = {}  # its bool copy: the kept decision's is set once the guard is done
        return dataclasses.replace(decision, masks={n: pack_local(m) for n, m in decision.masks.items()})

    def unpacked(decision: Decision) -> Decision:
        return dataclasses.replace(decision, masks={n: unpack_local(m) for n, m in decision.masks.items()})

    kept, probe.guard_report = guarded(
        probe.engine, record.layers, batches, loss_of, decide_packed,
        None if updates_weights else lambda vetoed: probe.engine.apply_masks(record.layers, unpacked(vetoed).masks),
        probe_label="probe threshold" if mode == "threshold" else "probe veto",
        release=None if keep_hessians else lambda: setattr(record, "hessians", None))
    kept = unpacked(kept)
    probe.masks, probe.equivalent_threshold = kept.masks, kept.equivalent_threshold
    if probe.backend.is_main:
        log.info("guard (rank 0): calibration loss %.5f with the probe, %.5f without (standard error of "
                 "the difference %.5f): keeping the %s masks", probe.guard_report["veto_loss"],
                 probe.guard_report["strategy_loss"], probe.guard_report["difference_se"],
                 probe.guard_report["kept"])
    return kept


def _decide(probe: GradProbe, record: ProbeRecord, sparsity: float, *, mode: str = "threshold",
            gradient_threshold: float = 0.0, target_scope: str = "layer", reconstruct: bool = False,
            veto_fraction: float | None = None, veto: bool = True) -> Decision:
    """The pure decision, applied to the weights (and reconstructed), kept as the results."""
    check_fraction(veto_fraction)
    if mode == "sparsegpt":
        check_mode(mode, 1.0, target_scope)
        check_threshold(gradient_threshold)
        masks = sparsegpt_with_veto(probe.backend, record, sparsity, gradient_threshold, veto_fraction,
                                    reconstruct, veto=veto)
        decision = counted(record, masks, probe.backend)
        probe.masks, probe.equivalent_threshold = decision.masks, None
        return decision
    if reconstruct and not record.hessians:
        raise ValueError("reconstruct=True needs the layers' input Hessians: call "
                         "probe(..., hessians=True) first")
    if mode == "threshold" and not veto:
        decision = _strategy_at_reached_sparsity(probe, record, sparsity, gradient_threshold)
    else:
        order, vetoes = probe.target_order(record, gradient_threshold=gradient_threshold,
                                           veto_fraction=veto_fraction, veto=veto) if mode == "target" else (None, None)
        decision = decide(record, sparsity, probe.backend, mode=mode, gradient_threshold=gradient_threshold,
                          target_scope=target_scope, order=order, vetoes=vetoes)
    probe.engine.apply_masks(record.layers, decision.masks)
    if reconstruct:
        compensate(probe.backend, record, decision.masks, transposed=record.transposed)
    probe.masks, probe.equivalent_threshold = decision.masks, decision.equivalent_threshold
    return decision


def _by_strategy(probe: GradProbe, dataloader: Iterable, loss_of: LossOfBatch, sparsity: float,
                 num_batches: int, verbose: bool, allocation: Allocation | None,
                 reconstruct: bool) -> dict[str, torch.Tensor]:
    """``prune_by_strategy``'s work: the selection at ``oversample=1`` is the decision."""
    check_selection_args(sparsity, num_batches)
    check_pattern(probe.strategy, sparsity)
    check_allocation(allocation, "target", "layer", probe.strategy)
    if allocation is not None and allocation.kind == "gradient":
        raise ValueError("allocation kind 'gradient' spreads the sparsity by the probe's gradient "
                         "ratios: use prune(..., mode='target', veto_fraction=0.0, allocation=...)")
    owl = allocation is not None and allocation.kind == "owl"
    norms_of = probe.owners if probe.strategy.needs_activations or owl else {}
    with probe.engine.session() as engine:
        if norms_of or reconstruct:
            measured = engine.forward_pass(take_batches(dataloader, num_batches), loss_of, verbose,
                                           norms_of=norms_of, hessians_of=probe.owners if reconstruct else None)
        else:  # nothing to measure: still refuse NaN/inf weights, as the passes would
            engine.check_weights_finite()
            measured = Baseline({}, {}, None, {}, None)
        masks, context, probe.layer_sparsity = select_tentative(
            probe.strategy, probe.backend, probe.model, probe.owners, measured.input_sq_norms, sparsity,
            1.0, allocation)
    if reconstruct:
        reconstruct_from(probe.backend, measured.hessians, masks,
                         lambda name: probe.backend.local_weight(name).clone(), transposed=context.transposed)
    probe.engine.zero(masks)
    probe.masks, probe.equivalent_threshold = masks, None
    sparsity_reached = probe.get_sparsity() if verbose else None  # a collective: every rank calls it
    if verbose and probe.backend.is_main:
        log.info("%s alone, no probe: sparsity %.2f%% (target %.2f%%)", probe.strategy.get_name(),
                 100 * sparsity_reached, 100 * sparsity)
    return masks


def _strategy_at_reached_sparsity(probe: GradProbe, record: ProbeRecord, sparsity: float,
                                  gradient_threshold: float) -> Decision:
    """Threshold mode without the probe (the guard's other side): the strategy's own masks,
    by its own rule, at the overall sparsity the threshold decision reached (an allocation's
    layer sparsities scaled by the same factor); Wanda's or magnitude's lowest scores at a
    lower sparsity lie inside their candidates at ``sparsity``."""
    check_guard("threshold", probe.strategy.get_name(), isinstance(probe.strategy, ScoredStrategy), record.nm)
    reached = decide(record, sparsity, probe.backend, gradient_threshold=gradient_threshold)
    at = reached.total_pruned / sum(record.slices[n].full_numel for n in record.layers)
    if record.layer_sparsity:
        scale = at / sparsity if sparsity else 0.0
        record = dataclasses.replace(record, layer_sparsity={n: min(1.0, s * scale)
                                                             for n, s in record.layer_sparsity.items()})
    candidates = {n: layer.tentative for n, layer in record.layers.items()}
    return counted(record, in_strategy_order(probe.backend, _strategy_order(probe, record), candidates, None, at),
                   probe.backend)


def _strategy_order(probe: GradProbe, record: ProbeRecord) -> StrategyOrder:
    """The strategy's scores of the original weights (an earlier decision undone first)
    and its selection rule, with the layer sparsities the probe used."""
    probe.engine.ensure_prepared()
    probe.engine.restore(record.layers)
    context = selection_context(probe.backend, probe.model, probe.owners, {})
    context.input_sq_norms = record.input_sq_norms or {}
    context.layer_sparsity = record.layer_sparsity
    strategy = probe.strategy
    return StrategyOrder(strategy.scores(context),
                         lambda scores, sparsity: strategy.select_lowest(context, scores, sparsity))


def _report(probe: GradProbe, decision: Decision, target: float) -> None:
    sparsity = probe.get_sparsity()  # a collective: every rank calls it
    if probe.backend.is_main:
        tentative, pruned = sum(decision.tentative.values()), decision.total_pruned
        log.info("%s: %d tentatively selected, %d pruned, %d restored; sparsity %.2f%% "
                 "(target %.2f%%)", probe.strategy.get_name(), tentative, pruned,
                 tentative - pruned, 100 * sparsity, 100 * target)
