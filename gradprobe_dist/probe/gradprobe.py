"""GradProbe: prune the weights whose gradient does not fight back when they shrink.

1. Baseline pass: ``num_batches`` calibration batches, forward + backward; fold each
   prunable weight's (rank-averaged) gradient into a statistic.
2. The strategy tentatively selects ``sparsity`` of the weights.
3. Selected weights are scaled to ``reduction_factor`` x value (their originals saved).
4. The same batches, replayed in the same order, give the statistic again.
5. A selected weight is pruned (exactly 0) if ``new <= old * (1 + gradient_threshold)``,
   otherwise restored bit-exactly from the saved original. Unselected weights never change.

The algorithm is written once; where gradients and weights live (one process, DDP, FSDP2,
ZeRO-3) is the backend's business (``gradprobe_dist.parallel``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from gradprobe_dist.probe import stats as statistics
from gradprobe_dist.strategies.activations import collect_input_sq_norms
from gradprobe_dist.strategies.allocation import Allocation, allocate, owl_scores, redundancy_scores
from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.parallel.local import LocalBackend
from gradprobe_dist.probe.batches import LossOfBatch, make_loss_of_batch, take_batches, to_device
from gradprobe_dist.probe.veto import check_fraction, probe_vetoes
from gradprobe_dist.reconstruct.apply import average_over_ranks, collect_input_hessians, compensate
from gradprobe_dist.reconstruct.layers import sparsegpt_masks
from gradprobe_dist.probe.decision import LayerProbe, ProbeRecord, check_nm, lowest_in_groups
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.masking import MaskHooks, keep_pruned
from gradprobe_dist.probe.params import find_prunable
from gradprobe_dist.probe.prefix import FrozenPrefix
from gradprobe_dist.strategies.base import PruningStrategy, SelectionContext, count_to_select, transposed_names
from gradprobe_dist.probe.validation import check_prune_args, check_threshold

log = get_logger(__name__)


class GradProbe:
    """Gradient-probing pruner for any ``nn.Module``.

    ``backend`` chooses the parallel mode (default: one process on ``device``).
    ``statistic``: ``"max_abs"`` (default, as the original), ``"mean_abs"`` or ``"rms"``.
    ``stat_dtype``/``stat_device``: precision and placement of the statistic (e.g.
    ``torch.bfloat16`` or ``"cpu"`` to save accelerator memory). ``include``/``exclude``:
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
        self.stat_device = torch.device(stat_device) if stat_device is not None else None
        self.owners = find_prunable(model, include, exclude, extra_prunable)
        self.param_names = list(self.owners)
        self.prefix = FrozenPrefix(model, self.param_names, enabled=cache_prefix, device=prefix_cache_device)
        self.masks: dict[str, torch.Tensor] = {}
        #: target mode: the gradient_threshold whose threshold-mode decision it matched at worst
        self.equivalent_threshold: float | None = None
        #: sparsity per layer when an allocation spread the target unevenly
        self.layer_sparsity: dict[str, float] | None = None
        self._mask_hooks: MaskHooks | None = None

    # -- public API --------------------------------------------------------------------------
    def prune(self, dataloader: Iterable, loss_fn: Callable | None = None, sparsity: float = 0.5,
              num_batches: int = 10, reduction_factor: float = 0.1,
              gradient_threshold: float = 0.0, verbose: bool = False, *,
              compute_loss: LossOfBatch | None = None, mode: str = "threshold",
              oversample: float = 1.5, target_scope: str = "layer",
              allocation: Allocation | None = None, reconstruct: bool = False,
              veto_fraction: float | None = None) -> dict[str, torch.Tensor]:
        """Probe and prune in place; returns masks (True = pruned) keyed by parameter name.

        ``mode="threshold"`` (the original): prune the selected weights whose gradient did not
        grow by more than ``gradient_threshold``; the result ends at or below ``sparsity``.
        ``mode="target"``: select ``oversample`` x ``sparsity`` tentatively and prune exactly
        the ``sparsity`` fraction with the lowest gradient ratio new/old, per layer
        (``target_scope="layer"``), over all layers (``"global"``), or N of every M with an
        N:M strategy; ``self.equivalent_threshold`` then says which threshold that was.
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
        (``gradprobe_dist.probe.veto``). Masks have the local shape of each weight (the full shape unless the backend shards).
        ``compute_loss(model, batch) -> loss`` replaces the default batch handling.
        """
        check_prune_args(sparsity, num_batches, reduction_factor, gradient_threshold)
        check_mode(mode, oversample, target_scope)
        check_fraction(veto_fraction)
        self._check_pattern(sparsity)
        self._check_allocation(allocation, mode, target_scope)
        record = self.probe(dataloader, loss_fn, sparsity, num_batches, reduction_factor,
                            verbose, compute_loss=compute_loss, allocation=allocation,
                            oversample=oversample if mode in ("target", "sparsegpt") else 1.0,
                            hessians=reconstruct or mode == "sparsegpt")
        self.masks = self.decide(record, sparsity, mode=mode, gradient_threshold=gradient_threshold,
                                 target_scope=target_scope, reconstruct=reconstruct,
                                 veto_fraction=veto_fraction)
        if verbose:
            self._report(record, sparsity)
        return self.masks

    def decide(self, record: ProbeRecord, sparsity: float, *, mode: str = "threshold",
               gradient_threshold: float = 0.0, target_scope: str = "layer",
               reconstruct: bool = False, veto_fraction: float | None = None) -> dict[str, torch.Tensor]:
        """Turn a probe's record into masks and apply them (see ``prune`` for the options);
        the pipeline calls ``probe`` and ``decide`` separately to checkpoint in between."""
        check_mode(mode, 1.0, target_scope)
        check_threshold(gradient_threshold)
        if mode == "sparsegpt":
            return self._decide_with_sparsegpt(record, sparsity, gradient_threshold, veto_fraction,
                                               reconstruct)
        if reconstruct and not record.hessians:
            raise ValueError("reconstruct=True needs the layers' input Hessians: call "
                             "probe(..., hessians=True) first")
        if mode == "threshold":
            masks = record.masks(gradient_threshold)
        else:
            masks = self.target_masks(record, sparsity, target_scope)
        self._check_nm_masks(masks, exact=mode == "target")
        self.apply_masks(record, masks)
        if reconstruct:
            compensate(self.backend, record, masks, transposed=transposed_names(self.owners))
        return masks

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
                masks = self.apply_decisions(record, t)
                results["weights_pruned"].append(self._global_count(masks))
                results["sparsities"].append(self.get_sparsity())
                results["metrics"].append(eval_fn(self.model))
                self._restore(record)
                if verbose and self.backend.is_main:
                    log.info("threshold %.4g: sparsity %.2f%%, metric %s", t,
                             100 * results["sparsities"][-1], results["metrics"][-1])
        finally:
            self._restore(record)
        return results

    def get_sparsity(self) -> float:
        """Fraction of exactly-zero entries over all prunable weights (all ranks)."""
        if not self._prepared:  # the backend must know the model to say where shards live
            self._wrapped = self.backend.prepare(self.model, self.param_names)
            self.backend.release()
        counts = torch.zeros(2, dtype=torch.float64)
        for name in self.param_names:
            w = self.backend.local_weight(name)
            counts[0] += int((w == 0).sum())
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
            with torch.no_grad():
                for name, mask in self.masks.items():
                    self.backend.local_weight(name).masked_fill_(mask, 0)
            self.backend.commit_weights(self.param_names)

    def remove_mask_hooks(self) -> None:
        if self._mask_hooks is not None:
            self._mask_hooks.remove()
            self._mask_hooks = None

    # -- the probe ---------------------------------------------------------------------------
    @property
    def _prepared(self) -> bool:
        return getattr(self, "_wrapped", None) is not None

    def probe(self, dataloader: Iterable, loss_fn: Callable | None, sparsity: float,
              num_batches: int, reduction_factor: float, verbose: bool = False, *,
              compute_loss: LossOfBatch | None = None, oversample: float = 1.0,
              allocation: Allocation | None = None, hessians: bool = False) -> ProbeRecord:
        """Run both gradient passes; return what they measured. The weights end unchanged.

        The strategy tentatively selects ``oversample`` x ``sparsity`` of each layer (capped at
        1), with ``sparsity`` spread over layers by an ``owl`` allocation; a ``gradient``
        allocation is computed after the passes. Either is kept in ``self.layer_sparsity``.
        ``hessians=True`` also records each Linear layer's input Hessian (for reconstruction).
        """
        check_prune_args(sparsity, num_batches, reduction_factor, 0.0)
        if sparsity * oversample >= 1.0 and self.backend.is_main:
            log.warning("oversample x sparsity = %.2f >= 1: every weight becomes a candidate and "
                        "the whole model is scaled down during the probe, which blurs the gradient "
                        "ratios; lower oversample", sparsity * oversample)
        self.layer_sparsity = None
        batches = take_batches(dataloader, num_batches)
        loss_of = make_loss_of_batch(loss_fn, compute_loss)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # dropout off: both passes must see the same function
        self._wrapped = self.backend.prepare(self.model, self.param_names)
        self.backend.zero_grad()  # gradients left by earlier training must not leak in
        owl = allocation is not None and allocation.kind == "owl"
        try:
            with collect_input_sq_norms(self.owners if self.strategy.needs_activations or owl else {}) as norms, \
                    collect_input_hessians(self.owners if hessians else {}) as local_hessians, \
                    self.prefix.recording():
                baseline = self._gradient_pass(batches, loss_of, "baseline", verbose)
            context = self._selection_context(norms)
            if owl:
                self.layer_sparsity = self._allocate(allocation, sparsity, owl_scores(
                    context.weights, context.slices, context.input_sq_norms, allocation.outlier_factor,
                    self.backend, context.transposed))
            context.layer_sparsity = {n: min(1.0, s * oversample) for n, s in
                                      (self.layer_sparsity or dict.fromkeys(self.param_names, sparsity)).items()}
            tentative = self._checked_masks(self.strategy.select(context, min(1.0, sparsity * oversample)))
            layers = self._scale_selected(tentative, baseline, reduction_factor)
            record = ProbeRecord(layers, average_over_ranks(local_hessians, self.backend) if hessians else None)
            try:
                with self.prefix.replaying():
                    reduced = self._gradient_pass(batches, loss_of, "reduced", verbose)
            finally:
                self._restore(record)
            for name, layer in layers.items():
                layer.new = reduced.pop(name)[layer.tentative.to(self._stat_device(name))]
            if allocation is not None and allocation.kind == "gradient":
                self.layer_sparsity = self._allocate(allocation, sparsity,
                                                     redundancy_scores(record, self.backend), record)
            return record
        finally:
            for module, training in modes.items():
                module.training = training
            self.backend.zero_grad()
            self.backend.release()

    def apply_decisions(self, record: ProbeRecord, gradient_threshold: float) -> dict[str, torch.Tensor]:
        """Threshold mode: zero the redundant selected weights, restore the others exactly."""
        return self.apply_masks(record, record.masks(gradient_threshold))

    def apply_masks(self, record: ProbeRecord, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zero ``masks`` (a subset of the tentative sets), restore every other tentative
        weight bit-exactly from its saved original; returns ``masks``."""
        with torch.no_grad():
            for name, layer in record.layers.items():
                w = self.backend.local_weight(name)
                w[layer.tentative] = layer.decided_values(masks[name]).to(w.device)
        self.backend.commit_weights(self.param_names)
        return masks

    def _decide_with_sparsegpt(self, record: ProbeRecord, sparsity: float, gradient_threshold: float,
                               veto_fraction: float | None, reconstruct: bool) -> dict[str, torch.Tensor]:
        if reconstruct:
            raise ValueError("mode='sparsegpt' updates the kept weights itself: drop reconstruct=True")
        missing = [n for n in record.layers if n not in (record.hessians or {})]
        if missing:
            raise ValueError(f"mode='sparsegpt' needs the input Hessian of every probed layer "
                             f"(probe(..., hessians=True), Linear layers only); {missing[0]!r} has none")
        vetoes = probe_vetoes(self.backend, record, gradient_threshold, veto_fraction)
        return sparsegpt_masks(self.backend, record.hessians, sparsity,
                               nm=getattr(self.strategy, "nm", None), vetoes=vetoes,
                               transposed=transposed_names(self.owners))

    def target_masks(self, record: ProbeRecord, sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
        """Exactly ``sparsity`` pruned (per layer / globally / N of every M), lowest gradient
        ratio first among the tentative weights; sets ``self.equivalent_threshold``."""
        ratios = {n: layer.ratio() for n, layer in record.layers.items()}
        nm = getattr(self.strategy, "nm", None)
        context = self._selection_context({})
        if nm:
            n, m = nm
            chosen = {}
            for name, layer in record.layers.items():
                # non-tentative positions rank after every tentative one, even a ratio of inf
                full = torch.full(layer.tentative.shape, float("inf"), device=ratios[name].device)
                full[layer.tentative] = ratios[name].clamp(max=torch.finfo(torch.float32).max)
                mask = context.select_in_rows(name, full, lambda rows: lowest_in_groups(rows, n, m))
                chosen[name] = mask.to(layer.tentative.device) & layer.tentative
            masks = chosen
        else:
            tentative = self.backend.sum_over_shards(torch.tensor(
                [int(layer.tentative.sum()) for layer in record.layers.values()], dtype=torch.float64))
            numels = [context.slices[n].full_numel for n in record.layers]
            if scope == "global":
                k = min(count_to_select(sum(numels), sparsity), int(tentative.sum()))
                picked = self.backend.select_smallest(list(ratios.values()), k)
            else:
                per_layer = self.layer_sparsity or dict.fromkeys(record.layers, sparsity)
                ks = [min(count_to_select(numel, per_layer[n]), int(t))
                      for n, numel, t in zip(record.layers, numels, tentative)]
                picked = self.backend.select_smallest_each(list(ratios.values()), ks)
            masks = {n: layer.expand(p) for (n, layer), p in zip(record.layers.items(), picked)}
        worst = max((float(ratios[n][masks[n][l.tentative]].max()) for n, l in record.layers.items()
                     if masks[n].any()), default=0.0)
        worst = float(self.backend.all_reduce(torch.tensor([worst], dtype=torch.float64, device=self.device), "max"))
        self.equivalent_threshold = max(0.0, worst - 1.0)
        return masks

    def _restore(self, record: ProbeRecord) -> None:
        with torch.no_grad():
            for name, layer in record.layers.items():
                w = self.backend.local_weight(name)
                w[layer.tentative] = layer.originals
        self.backend.commit_weights(self.param_names)

    def _stat_device(self, name: str) -> torch.device:
        return self.stat_device or self.backend.local_weight(name).device

    def _gradient_pass(self, batches: list, loss_of: LossOfBatch, label: str,
                       verbose: bool) -> dict[str, torch.Tensor]:
        backend = self.backend
        acc = {n: statistics.new_accumulator(backend.local_weight(n), self.stat_dtype,
                                             self._stat_device(n)) for n in self.param_names}
        bar = tqdm(batches, desc=f"{label} pass", disable=not (verbose and backend.is_main),
                   leave=False)
        loss_finite = []
        for index, batch in enumerate(bar):
            self.prefix.select(index)
            loss = loss_of(self._wrapped, to_device(batch, backend.device))
            loss_finite.append(torch.isfinite(loss.detach()))  # no sync: read once per pass
            backend.backward(loss)
            for name in self.param_names:
                statistics.accumulate(acc[name], self._local_grad(name, index), self.statistic)
            backend.zero_grad()
        self._check_pass_finite(acc, loss_finite, batches, loss_of, label)
        return {n: statistics.finalize(a, self.statistic, len(batches)) for n, a in acc.items()}

    def _local_grad(self, name: str, index: int) -> torch.Tensor:
        grad = self.backend.local_grad(name)
        if grad is None:
            self.backend.zero_grad()
            raise ValueError(f"parameter {name!r} received no gradient in calibration batch "
                             f"{index}: the forward pass does not use it; exclude it with "
                             f"exclude=['{name}']")
        return grad

    def _check_pass_finite(self, acc: dict[str, torch.Tensor], loss_finite: list, batches: list,
                           loss_of: LossOfBatch, label: str) -> None:
        """One check per pass: NaN/inf survive max/add into the accumulators, and each batch's
        loss flag was kept. On a hit (rare), every rank replays the batches one by one to name
        the first bad batch and parameter; checking every gradient of every batch would cost a
        full extra read per step."""
        losses_ok = torch.stack(loss_finite).cpu()
        first_bad_loss = int((~losses_ok).nonzero()[0]) if not bool(losses_ok.all()) else len(batches)
        stats_ok = bool(torch.stack([torch.isfinite(a).all() for a in acc.values()]).all())
        flag = torch.tensor([first_bad_loss, int(stats_ok)], dtype=torch.int64, device=self.device)
        first_bad_loss, stats_ok = self.backend.all_reduce(flag, "min").tolist()
        if first_bad_loss == len(batches) and stats_ok:
            return
        for index, batch in enumerate(batches):
            self.prefix.select(index)
            loss = loss_of(self._wrapped, to_device(batch, self.backend.device))
            self.backend.backward(loss)
            finite = [torch.isfinite(self._local_grad(n, index)).all() for n in self.param_names]
            self.backend.zero_grad()
            self._check_finite(index, label, loss, finite)
        if first_bad_loss < len(batches):
            raise FloatingPointError(
                f"non-finite loss (NaN/inf) in calibration batch {first_bad_loss} of the {label} pass "
                "(it did not recur when the batches were replayed: something in the loss or the "
                "model is not deterministic); the model was left unchanged. Check that batch and "
                "the loss function for NaN/inf")
        raise FloatingPointError(
            f"the gradient statistic of the {label} pass overflowed in {self.stat_dtype} although "
            "every gradient is finite when replayed: use stat_dtype=torch.float32")

    def _check_finite(self, index: int, label: str, loss: torch.Tensor, finite: list) -> None:
        """Every rank raises the same error for the first non-finite gradient (no hang)."""
        names = self.param_names
        ok = torch.stack(finite).cpu() if finite else torch.ones(0, dtype=torch.bool)
        bad_local = len(names) + 1
        if not bool(ok.all()):
            bad_local = int((~ok).nonzero()[0])
        elif not bool(torch.isfinite(loss.detach()).cpu()):
            bad_local = len(names)
        flag = self.backend.all_reduce(torch.tensor([bad_local], dtype=torch.int64, device=self.device), "min")
        bad = int(flag.item())
        if bad > len(names):
            return
        what = f"parameter {names[bad]!r}" if bad < len(names) else "the loss"
        raise FloatingPointError(
            f"non-finite gradient (NaN/inf) in calibration batch {index} of the {label} pass, in "
            f"{what} (loss on rank {self.backend.rank}: {float(loss.detach()):.4g}); the model was "
            "left unchanged. Check that batch for NaN/inf inputs or labels; with fp16 weights "
            "try float32/bfloat16; lower the data's scale if activations overflow")

    def _selection_context(self, norms: dict[str, torch.Tensor]) -> SelectionContext:
        backend = self.backend
        if norms:  # every rank saw its own micro-batches: sum over ranks, in one collective
            missing = [n for n in self.param_names if n not in norms]
            if missing:
                raise ValueError(f"no input reached layer {missing[0]!r} during calibration, so "
                                 "its activation norms are unknown; exclude it")
            flat = backend.all_reduce(torch.cat([norms[n].reshape(-1) for n in self.param_names]), "sum")
            norms = dict(zip(self.param_names, flat.split([norms[n].numel() for n in self.param_names])))
        return SelectionContext(
            weights={n: backend.local_weight(n) for n in self.param_names},
            slices={n: backend.local_slice(n) for n in self.param_names},
            backend=backend, input_sq_norms=norms, model=self.model,
            transposed=transposed_names(self.owners))

    def _checked_masks(self, masks) -> dict[str, torch.Tensor]:
        """Validate a strategy's output; masks for non-prunable parameters are ignored."""
        if not isinstance(masks, dict):
            raise TypeError(f"{self.strategy.get_name()}: select_weights_to_prune must return a "
                            f"dict name -> bool mask, got {type(masks).__name__}")
        known = {n for n, _ in self.model.named_parameters()}
        unknown = sorted(set(masks) - known)
        if unknown:
            raise ValueError(f"strategy {self.strategy.get_name()!r} returned masks for unknown "
                             f"parameters {unknown[:5]}: use names from model.named_parameters()")
        ignored = sorted(set(masks) - set(self.param_names))
        if ignored:
            log.info("ignoring masks for %d non-prunable parameters (e.g. %s); choose prunable "
                     "parameters with extra_prunable=[...]", len(ignored), ignored[0])
        checked = {}
        for name in self.param_names:
            w = self.backend.local_weight(name)
            mask = masks.get(name)
            if mask is None:
                checked[name] = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"strategy {self.strategy.get_name()!r} returned a mask of dtype "
                                f"{getattr(mask, 'dtype', type(mask).__name__)} for {name!r}: "
                                "masks must be torch.bool tensors (True = prune)")
            if mask.shape != w.shape:
                raise ValueError(f"strategy {self.strategy.get_name()!r} returned a mask of shape "
                                 f"{list(mask.shape)} for {name!r}, whose (local) weight has shape "
                                 f"{list(w.shape)}")
            checked[name] = mask.to(w.device)
        return checked

    def _scale_selected(self, tentative: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor],
                        reduction_factor: float) -> dict[str, LayerProbe]:
        """Save the selected originals, keep the baseline only where selected, scale down."""
        layers = {}
        with torch.no_grad():
            for name, mask in tentative.items():
                w = self.backend.local_weight(name)
                old = baseline.pop(name)[mask.to(self._stat_device(name))]
                layers[name] = LayerProbe(tentative=mask, old=old, originals=w[mask])  # a copy
                # x * 1.0 is exact, so unselected weights keep their bits
                w.mul_(torch.where(mask, reduction_factor, 1.0).to(w.dtype))
        self.backend.commit_weights(self.param_names)
        return layers

    def _global_count(self, masks: dict[str, torch.Tensor]) -> int:
        local = torch.tensor([sum(int(m.sum()) for m in masks.values())], dtype=torch.float64)
        return int(self.backend.sum_over_shards(local).item())

    def _report(self, record: ProbeRecord, target: float) -> None:
        counts = torch.tensor([[int(l.tentative.sum()), int(self.masks[n].sum())]
                               for n, l in record.layers.items()], dtype=torch.float64)
        counts = self.backend.sum_over_shards(counts)
        sparsity = self.get_sparsity()  # a collective: every rank calls it
        if self.backend.is_main:
            tentative, pruned = counts.sum(0).tolist()
            log.info("%s: %d tentatively selected, %d pruned, %d restored; sparsity %.2f%% "
                     "(target %.2f%%)", self.strategy.get_name(), tentative, pruned,
                     tentative - pruned, 100 * sparsity, 100 * target)

    def _allocate(self, allocation: Allocation, sparsity: float, scores: dict[str, float],
                  record: ProbeRecord | None = None) -> dict[str, float]:
        """Layer sparsities from scores; after the probe a layer can't exceed what it selected."""
        numels = {n: self.backend.local_slice(n).full_numel for n in self.param_names}
        high = allocation.max_sparsity
        if record is not None:
            tentative = self.backend.sum_over_shards(torch.tensor(
                [float(l.tentative.sum()) for l in record.layers.values()], dtype=torch.float64))
            high = min([high] + [float(t) / numels[n] for n, t in zip(record.layers, tentative)])
        if high < sparsity:
            raise ValueError(f"allocation cannot reach sparsity {sparsity}: a layer is capped at "
                             f"{high:.3f}; raise oversample or allocation.max_sparsity")
        return allocate(scores, numels, sparsity, allocation.spread, allocation.min_sparsity, high)

    def _check_allocation(self, allocation: Allocation | None, mode: str, target_scope: str) -> None:
        if allocation is None or allocation.kind == "uniform":
            return
        if mode == "sparsegpt":
            raise ValueError("mode='sparsegpt' prunes every layer to the same sparsity: use the "
                             "uniform allocation")
        if allocation.kind == "gradient" and mode != "target":
            raise ValueError("allocation kind 'gradient' decides layer sparsities from the probe's "
                             "ratios, so it needs mode='target'")
        if target_scope != "layer" or getattr(self.strategy, "nm", None) or \
                getattr(self.strategy, "scope", "layer") != "layer":
            raise ValueError("a per-layer allocation needs per-layer selection: use a layer-scoped "
                             "strategy (not global or N:M) and target_scope='layer'")

    def _check_nm_masks(self, masks: dict[str, torch.Tensor], exact: bool) -> None:
        """Every N:M-pruned layer must hold at most (threshold) or exactly (target) N zeros
        per group; flat ZeRO-3 parts cut groups, so those are checked once gathered."""
        nm = getattr(self.strategy, "nm", None)
        if nm:
            for name, mask in masks.items():
                if self.backend.local_slice(name).layout != "flat":
                    check_nm(mask, *nm, exact=exact)

    def _check_pattern(self, sparsity: float) -> None:
        nm = getattr(self.strategy, "nm", None)
        if nm and abs(sparsity - nm[0] / nm[1]) > 1e-9:
            raise ValueError(f"strategy {self.strategy.get_name()} prunes {nm[0]} of every {nm[1]} "
                             f"weights: pass sparsity={nm[0] / nm[1]} (got {sparsity})")


MODES = ("threshold", "target", "sparsegpt")
TARGET_SCOPES = ("layer", "global")


def check_mode(mode: str, oversample: float, target_scope: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'threshold' (prune what the probe "
                         "finds redundant), 'target' (reach the sparsity exactly) or 'sparsegpt' "
                         "(SparseGPT's mask, the probe as a veto)")
    if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or oversample < 1.0:
        raise ValueError(f"oversample={oversample!r} must be a number >= 1: the target mode "
                         "probes oversample x sparsity candidates and keeps the best")
    if target_scope not in TARGET_SCOPES:
        raise ValueError(f"target_scope={target_scope!r} is unknown: use 'layer' or 'global'")
