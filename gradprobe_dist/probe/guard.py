"""The calibration-loss guard: keep the probe's vetoed masks only when they measure better.

The probe's veto (or its iterative rounds) moves the strategy's (or SparseGPT's) choice;
whether that helps is not guaranteed, so the guard decides both ways (with the probe, and the
strategy's own masks / plain SparseGPT) and runs the probe's own calibration batches forward
through each: the one with the lower mean loss is kept (the probe's only when strictly lower).
No evaluation data is involved, so nothing is tuned on the text a user measures on.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gradprobe_dist.probe.batches import LossOfBatch
from gradprobe_dist.probe.engine import ProbeEngine

Result = TypeVar("Result")


def guarded(engine: ProbeEngine, names, batches: list, loss_of: LossOfBatch,
            decide: Callable[[bool], Result], reapply: Callable[[Result], None] | None,
            probe_label: str = "probe veto") -> tuple[Result, dict]:
    """``decide(veto)`` applies a decision to the weights ``names``; both are tried, the
    better one is left applied. ``reapply(result)`` puts the vetoed decision back when the
    decisions only zero weights; None when they also change kept weights (SparseGPT,
    reconstruction) or zero them for good (iterative rounds), so each side starts from the
    original weights and the winner's are written back.
    Returns the kept result and ``{"kept": probe_label or "strategy", "veto_loss", "strategy_loss"}``."""
    originals = engine.weights_copy(names) if reapply is None else None
    vetoed = decide(True)
    vetoed_loss = engine.calibration_loss(batches, loss_of)
    vetoed_weights = engine.weights_copy(names) if reapply is None else None
    if reapply is None:
        engine.put_weights(originals)
    own = decide(False)
    own_loss = engine.calibration_loss(batches, loss_of)
    keep_veto = vetoed_loss < own_loss
    if keep_veto:
        if reapply is None:
            engine.put_weights(vetoed_weights)
        else:
            reapply(vetoed)
    report = {"kept": probe_label if keep_veto else "strategy", "veto_loss": vetoed_loss,
              "strategy_loss": own_loss}
    return (vetoed if keep_veto else own), report
