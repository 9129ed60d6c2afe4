"""The calibration-loss guard: keep the probe's vetoed masks only when they measure better.

The probe's veto moves the strategy's (or SparseGPT's) choice; whether that helps is not
guaranteed, so the guard decides both ways (with the veto, and the strategy's own masks /
plain SparseGPT) and runs the probe's own calibration batches forward through each: the one
with the lower mean loss is kept (the veto's only when strictly lower). No evaluation data
is involved, so nothing is tuned on the text a user measures on.
"""
from __future__ import annotations

from collections.abc import Callable

from gradprobe_dist.probe.batches import LossOfBatch
from gradprobe_dist.probe.decision import Decision
from gradprobe_dist.probe.engine import ProbeEngine
from gradprobe_dist.probe.record import ProbeRecord


def guarded(engine: ProbeEngine, record: ProbeRecord, batches: list, loss_of: LossOfBatch,
            decide: Callable[[bool], Decision], updates_weights: bool) -> tuple[Decision, dict]:
    """``decide(veto)`` applies a decision; both are tried, the better one is left applied.
    ``updates_weights``: the decision also changes kept weights (SparseGPT, reconstruction),
    so each side starts from the original weights and the winner's are written back.
    Returns the kept decision and ``{"kept", "veto_loss", "strategy_loss"}``."""
    originals = engine.weights_copy(record.layers) if updates_weights else None
    vetoed = decide(True)
    vetoed_loss = engine.calibration_loss(batches, loss_of)
    vetoed_weights = engine.weights_copy(record.layers) if updates_weights else None
    if updates_weights:
        engine.put_weights(originals)
    own = decide(False)
    own_loss = engine.calibration_loss(batches, loss_of)
    keep_veto = vetoed_loss < own_loss
    if keep_veto:
        if updates_weights:
            engine.put_weights(vetoed_weights)
        else:
            engine.apply_masks(record.layers, vetoed.masks)
    report = {"kept": "probe veto" if keep_veto else "strategy", "veto_loss": vetoed_loss,
              "strategy_loss": own_loss}
    return (vetoed if keep_veto else own), report
