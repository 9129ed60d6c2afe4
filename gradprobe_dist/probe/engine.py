"""The two gradient passes and the weight edits around them (and a forward-only pass for a
strategy that selects without them).

The baseline pass folds every prunable weight's (rank-averaged) gradient into a statistic
over the calibration batches; the tentatively selected weights are then scaled down
(originals saved), the same batches are replayed, and every weight is restored bit-exactly,
so the passes leave the model as they found it. Applying a decision's masks later zeroes
the pruned weights and restores the rest from the same saved originals.

Where gradients and weights live is the backend's business; NaN/inf is checked once per
pass (no sync per batch) and, on a hit, diagnosed by replaying the batches one by one.
A stage's frozen prefix (``prefix``) runs in the baseline pass only: the reduced pass
replays its recorded output.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from gradprobe_dist.checkpoint.masks import pack_local, unpack_local
from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe import stats as statistics
from gradprobe_dist.probe.batches import LossOfBatch, to_device
from gradprobe_dist.probe.prefix import FrozenPrefix
from gradprobe_dist.probe.record import LayerProbe
from gradprobe_dist.reconstruct.hessians import Hessians, average_over_ranks, collect_input_hessians
from gradprobe_dist.strategies.activations import collect_input_sq_norms


@dataclass
class GradientPass:
    """One pass over the batches: the statistic per weight, the signed mean gradient per
    weight (only when asked for), and the mean loss over the batches and ranks."""

    stats: dict[str, torch.Tensor]
    signed: dict[str, torch.Tensor]
    loss: float | None


@dataclass
class Baseline(GradientPass):
    """What the baseline pass measured, and this rank's input-feature norms (for
    activation-aware strategies) and the rank-averaged input Hessians (or None), each matrix
    on its owner rank."""

    input_sq_norms: dict[str, torch.Tensor]
    hessians: Hessians | None


class ProbeEngine:
    """Gradient passes over ``model``'s prunable weights ``param_names`` through ``backend``."""

    def __init__(self, model: nn.Module, backend: Backend, param_names: list[str], statistic: str,
                 stat_dtype: torch.dtype, stat_device: torch.device | None, prefix: FrozenPrefix):
        self.model = model
        self.backend = backend
        self.param_names = param_names
        self.statistic = statistic
        self.stat_dtype = stat_dtype
        self.stat_device = stat_device
        self.prefix = prefix
        #: what forward is called on (the backend's wrapper), once prepared
        self.module: nn.Module | None = None

    def ensure_prepared(self) -> None:
        """Let the backend know the model (it must, to say where shards live)."""
        if self.module is None:
            self.module = self.backend.prepare(self.model, self.param_names)
            self.backend.release()

    @contextmanager
    def session(self):
        """Dropout off and the model prepared while inside; modes, gradients and the
        backend's temporary state given back on the way out, whatever happens."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()  # dropout off: both passes must see the same function
        try:
            self.module = self.backend.prepare(self.model, self.param_names)
            self.backend.zero_grad()  # gradients left by earlier training must not leak in
            yield self
        finally:
            for module, training in modes.items():
                module.training = training
            self.backend.zero_grad()
            self.backend.release()

    # -- the two passes ----------------------------------------------------------------------
    def baseline(self, batches: list, loss_of: LossOfBatch, verbose: bool, *,
                 norms_of: dict[str, nn.Module], hessians_of: dict[str, nn.Module] | None,
                 signed: bool = False) -> Baseline:
        """The first pass; forward hooks on ``norms_of``/``hessians_of`` collect input norms and
        Hessians on the way (no extra pass). ``hessians_of=None``: no Hessians. ``signed``:
        also the signed mean gradients (for loss-change estimates)."""
        with self.prefix.recording():
            return self._measured(lambda: self.gradient_pass(batches, loss_of, "baseline", verbose, signed),
                                  norms_of, hessians_of)

    def forward_pass(self, batches: list, loss_of: LossOfBatch, verbose: bool, *,
                     norms_of: dict[str, nn.Module], hessians_of: dict[str, nn.Module] | None) -> Baseline:
        """``baseline`` without the backward (its ``stats`` empty): what a strategy selecting
        without the probe needs (Wanda's input norms; Hessians to reconstruct)."""
        def forward_only() -> GradientPass:
            bar = tqdm(batches, desc="forward pass", disable=not (verbose and self.backend.is_main), leave=False)
            with torch.no_grad():
                loss_finite = [torch.isfinite(loss_of(self.module, to_device(batch, self.backend.device)))
                               for batch in bar]
            self._check_pass_finite({}, loss_finite, batches, loss_of, "forward")
            return GradientPass({}, {}, None)
        return self._measured(forward_only, norms_of, hessians_of)

    def _measured(self, run_pass, norms_of: dict[str, nn.Module],
                  hessians_of: dict[str, nn.Module] | None) -> Baseline:
        """``run_pass()`` (-> a ``GradientPass``) with the input hooks of ``baseline`` around it."""
        with collect_input_sq_norms(norms_of) as norms, collect_input_hessians(hessians_of or {}) as local:
            measured = run_pass()
        hessians = average_over_ranks(local, self.backend) if hessians_of is not None else None
        return Baseline(measured.stats, measured.signed, measured.loss, norms, hessians)

    def reduced(self, batches: list, loss_of: LossOfBatch, tentative: dict[str, torch.Tensor],
                baseline: Baseline, reduction_factor: float,
                verbose: bool) -> tuple[dict[str, LayerProbe], float]:
        """Scale the ``tentative`` weights by ``reduction_factor``, replay the batches, restore
        every weight; returns each layer's old and new statistic (and signed mean gradients
        when the baseline has them) at its tentative positions, and the pass's mean loss.
        The baseline's full-size statistics are consumed (kept only at the candidates), and so
        is ``tentative`` (emptied): its masks move into the records, and wait packed one bit
        per weight while the batches run (a bool mask is a byte per weight whatever the dtype)."""
        signed = bool(baseline.signed)  # before scaling, which consumes the baseline
        layers = self._scale_selected(tentative, baseline, reduction_factor)
        tentative.clear()
        waiting = {n: pack_local(layer.tentative) for n, layer in layers.items()}
        for layer in layers.values():
            layer.tentative = None
        try:
            with self.prefix.replaying():
                reduced = self.gradient_pass(batches, loss_of, "reduced", verbose, signed=signed)
        finally:
            for name, layer in layers.items():
                layer.tentative = unpack_local(waiting.pop(name))
            self.restore(layers)
        for name, layer in layers.items():
            at = layer.tentative.to(self._stat_device(name))
            layer.new = reduced.stats.pop(name).masked_select(at)
            if reduced.signed:
                layer.new_signed = reduced.signed.pop(name).masked_select(at)
        return layers, reduced.loss

    def gradient_pass(self, batches: list, loss_of: LossOfBatch, label: str, verbose: bool,
                      signed: bool = False) -> GradientPass:
        """Forward + backward of every batch, each weight's gradient folded into its statistic
        (and, with ``signed``, into a running sum for its signed mean)."""
        backend = self.backend
        acc = dict.fromkeys(self.param_names)  # started by the first batch's gradients
        sums = {n: statistics.new_accumulator(backend.local_weight(n), torch.float32, self._stat_device(n))
                for n in self.param_names} if signed else {}  # float32 whatever stat_dtype: signed sums cancel
        bar = tqdm(batches, desc=f"{label} pass", disable=not (verbose and backend.is_main),
                   leave=False)
        losses = []
        for index, batch in enumerate(bar):
            self.prefix.select(index)
            loss = loss_of(self.module, to_device(batch, backend.device))
            losses.append(loss.detach())  # no sync: read once per pass
            backend.backward(loss)
            for name in self.param_names:
                grad = self._local_grad(name, index)
                acc[name] = statistics.accumulate(acc[name], grad, self.statistic, self.stat_dtype,
                                                  self._stat_device(name))
                if signed:
                    sums[name].add_(grad.detach().to(sums[name].device))
            backend.zero_grad()
        self._check_pass_finite({**acc, **{f"{n} (signed sum)": s for n, s in sums.items()}},
                                [torch.isfinite(loss) for loss in losses], batches, loss_of, label)
        total = backend.all_reduce(torch.stack(losses).double().sum().reshape(1).to(backend.device), "sum")
        return GradientPass({n: statistics.finalize(a, self.statistic, len(batches)) for n, a in acc.items()},
                            {n: s.div_(len(batches)) for n, s in sums.items()},
                            float(total) / (backend.world_size * len(batches)))

    # -- weight edits ------------------------------------------------------------------------
    def _scale_selected(self, tentative: dict[str, torch.Tensor], baseline: Baseline,
                        reduction_factor: float) -> dict[str, LayerProbe]:
        """Save the selected originals, keep the baseline only where selected, scale down."""
        layers = {}
        with torch.no_grad():
            for name, mask in tentative.items():
                w = self.backend.local_weight(name)
                at = mask.to(self._stat_device(name))
                old = baseline.stats.pop(name).masked_select(at)
                old_signed = baseline.signed.pop(name).masked_select(at) if baseline.signed else None
                layers[name] = LayerProbe(tentative=mask, old=old, originals=w.masked_select(mask),  # a copy
                                          old_signed=old_signed)
                # x * 1.0 is exact, so unselected weights keep their bits
                w.mul_(torch.where(mask, reduction_factor, 1.0).to(w.dtype))
        self.backend.commit_weights(self.param_names)
        return layers

    def restore(self, layers: dict[str, LayerProbe]) -> None:
        """Every tentative weight back to its saved original, bit-exactly."""
        with torch.no_grad():
            for name, layer in layers.items():
                self.backend.local_weight(name).masked_scatter_(layer.tentative, layer.originals)
        self.backend.commit_weights(self.param_names)

    def apply_masks(self, layers: dict[str, LayerProbe], masks: dict[str, torch.Tensor]) -> None:
        """Zero ``masks`` (a subset of the tentative sets), restore every other tentative
        weight bit-exactly from its saved original."""
        with torch.no_grad():
            for name, layer in layers.items():
                w = self.backend.local_weight(name)
                w.masked_scatter_(layer.tentative, layer.originals.to(w.device))
                w.masked_fill_(masks[name].to(w.device) & layer.tentative, 0)
        self.backend.commit_weights(self.param_names)

    def zero(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero ``masks`` in the weights (a decision taken without the passes: nothing saved)."""
        with torch.no_grad():
            for name, mask in masks.items():
                w = self.backend.local_weight(name)
                w.masked_fill_(mask.to(w.device), 0)
        self.backend.commit_weights(self.param_names)

    def weights_copy(self, names) -> dict[str, torch.Tensor]:
        """This rank's local parts of the weights ``names`` (copies)."""
        return {n: self.backend.local_weight(n).detach().clone() for n in names}

    def put_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Write back what ``weights_copy`` returned."""
        with torch.no_grad():
            for name, value in weights.items():
                self.backend.local_weight(name).copy_(value)
        self.backend.commit_weights(self.param_names)

    # -- forward only ------------------------------------------------------------------------
    def calibration_losses(self, batches: list, loss_of: LossOfBatch) -> torch.Tensor:
        """The loss of every global batch (the mean of every rank's ``batches[i]``), forward
        only, the frozen prefix replayed from the baseline pass: what a decision between two
        masks compares, batch by batch."""
        losses = torch.zeros(len(batches), dtype=torch.float64)
        with self.session(), torch.no_grad(), self.prefix.replaying():
            for index, batch in enumerate(batches):
                self.prefix.select(index)
                losses[index] = float(loss_of(self.module, to_device(batch, self.backend.device)))
        return self.backend.all_reduce(losses.to(self.backend.device), "sum").cpu() / self.backend.world_size

    # -- gradients and their checks ----------------------------------------------------------
    def _stat_device(self, name: str) -> torch.device:
        return self.stat_device or self.backend.local_weight(name).device

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
        stats_ok = bool(torch.stack([statistics.all_finite(a) for a in acc.values()]).all()) if acc else True
        flag = torch.tensor([first_bad_loss, int(stats_ok)], dtype=torch.int64, device=self.backend.device)
        first_bad_loss, stats_ok = self.backend.all_reduce(flag, "min").tolist()
        if first_bad_loss == len(batches) and stats_ok:
            return
        self.check_weights_finite()
        for index, batch in enumerate(batches):
            self.prefix.select(index)
            loss = loss_of(self.module, to_device(batch, self.backend.device))
            self.backend.backward(loss)
            finite = [statistics.all_finite(self._local_grad(n, index)) for n in self.param_names]
            self.backend.zero_grad()
            self._raise_if_not_finite(index, label, loss, finite)
        if first_bad_loss < len(batches):
            raise FloatingPointError(
                f"non-finite loss (NaN/inf) in calibration batch {first_bad_loss} of the {label} pass "
                "(it did not recur when the batches were replayed: something in the loss or the "
                "model is not deterministic); the model was left unchanged. Check that batch and "
                "the loss function for NaN/inf")
        raise FloatingPointError(
            f"the gradient statistic of the {label} pass overflowed in {self.stat_dtype} although "
            "every gradient is finite when replayed: use stat_dtype=torch.float32")

    def check_weights_finite(self) -> None:
        """A NaN/inf already in the weights poisons every batch: name that parameter (the
        first in model order on any rank) rather than blame the data."""
        names = [n for n, _ in self.model.named_parameters()]
        bad_local = next((i for i, (_, p) in enumerate(self.model.named_parameters())
                          if not bool(statistics.all_finite(self.backend.local_part(p).detach()))), len(names))
        flag = torch.tensor([bad_local], dtype=torch.int64, device=self.backend.device)
        bad = int(self.backend.all_reduce(flag, "min").item())
        if bad < len(names):
            raise FloatingPointError(
                f"parameter {names[bad]!r} holds NaN/inf values before any pruning; the model was "
                "left unchanged. Load or train a model with finite weights")

    def _raise_if_not_finite(self, index: int, label: str, loss: torch.Tensor, finite: list) -> None:
        """Every rank raises the same error for the first non-finite gradient (no hang)."""
        names = self.param_names
        ok = torch.stack(finite).cpu() if finite else torch.ones(0, dtype=torch.bool)
        bad_local = len(names) + 1
        if not bool(ok.all()):
            bad_local = int((~ok).nonzero()[0])
        elif not bool(torch.isfinite(loss.detach()).cpu()):
            bad_local = len(names)
        flag = torch.tensor([bad_local], dtype=torch.int64, device=self.backend.device)
        bad = int(self.backend.all_reduce(flag, "min").item())
        if bad > len(names):
            return
        what = f"parameter {names[bad]!r}" if bad < len(names) else "the loss"
        raise FloatingPointError(
            f"non-finite gradient (NaN/inf) in calibration batch {index} of the {label} pass, in "
            f"{what} (loss on rank {self.backend.rank}: {float(loss.detach()):.4g}); the model was "
            "left unchanged. Check that batch for NaN/inf inputs or labels; with fp16 weights "
            "try float32/bfloat16; lower the data's scale if activations overflow")
