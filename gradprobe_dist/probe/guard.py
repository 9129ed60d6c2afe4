"""The calibration-loss guard: keep the probe's vetoed masks only when they measure better.

The probe's veto (or its iterative rounds) moves the strategy's (or SparseGPT's) choice;
whether that helps is not guaranteed, so the guard decides both ways (with the probe, and the
strategy's own masks / plain SparseGPT) and runs calibration batches forward through each:
the probe's own, or (``scored_batches``) batches held out from it. The probe's masks are
kept only when they win clearly: their mean loss lower by more than ``WIN_STANDARD_ERRORS``
standard errors of the batch-by-batch difference (``probe_wins``). A narrower win is noise
the user's text need not share. Measured on SmolLM2: at 30% a veto won by 0.0015 nats of
calibration loss and lost 1.3 perplexity on the validation text; at 50% iterative rounds
won by 1.3 standard errors on held-out calibration batches and lost 2.0 perplexity (seed 1),
where a win by 3.3 standard errors held on the validation text (seed 0). No evaluation data
is involved in the decision.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from gradprobe_dist.probe.batches import LossOfBatch
from gradprobe_dist.probe.engine import ProbeEngine

Result = TypeVar("Result")


def scored_batches(guard: bool, guard_batches: Iterable | None, probe_batches: list) -> list:
    """The batches the guard scores on: ``guard_batches`` (calibration batches held out from
    the probe) when given, else the probe's own. Refuses held-out batches without a guard or
    an empty set of them, before anything is probed."""
    if guard_batches is None:
        return probe_batches
    if not guard:
        raise ValueError("guard_batches are what the guard scores on: pass guard=True with them, "
                         "or drop guard_batches")
    held_out = list(guard_batches)
    if not held_out:
        raise ValueError("guard_batches is empty: give the guard at least one calibration batch "
                         "the probe does not use, or None to score on the probe's own")
    return held_out


#: how many standard errors of the per-batch difference the probe's masks must win by
WIN_STANDARD_ERRORS = 2.0


def probe_wins(probe_losses: torch.Tensor, strategy_losses: torch.Tensor) -> tuple[bool, float]:
    """Whether the probe's per-batch losses beat the strategy's on the same batches: the mean
    paired difference below minus ``WIN_STANDARD_ERRORS`` standard errors of it (strictly
    below zero for one batch, which has no error estimate). Pure; returns the verdict and
    that standard error."""
    difference = probe_losses.double() - strategy_losses.double()
    n = difference.numel()
    error = float(difference.std(correction=1)) / math.sqrt(n) if n > 1 else 0.0
    return float(difference.mean()) < -WIN_STANDARD_ERRORS * error, error


def guarded(engine: ProbeEngine, names, batches: list, loss_of: LossOfBatch,
            decide: Callable[[bool], Result], reapply: Callable[[Result], None] | None,
            probe_label: str = "probe veto", release: Callable[[], None] | None = None) -> tuple[Result, dict]:
    """``decide(veto)`` applies a decision to the weights ``names``; both are tried, the
    better one is left applied. ``reapply(result)`` puts the vetoed decision back when the
    decisions only zero weights; None when they also change kept weights (SparseGPT,
    reconstruction) or zero them for good (iterative rounds), so each side starts from the
    original weights and the winner's are written back. ``release()``, when given, runs once
    both decisions are made: what only they need (the Hessians) is gone before the batches
    run forward.
    Returns the kept result and ``{"kept": probe_label or "strategy", "veto_loss",
    "strategy_loss", "difference_se"}``: the two mean calibration losses and the standard
    error of their per-batch difference (see ``probe_wins``)."""
    if reapply is None:
        vetoed, own, vetoed_losses, own_losses, keep_veto, error = _by_weight_copies(
            engine, names, batches, loss_of, decide, release)
    else:
        vetoed = decide(True)
        vetoed_losses = engine.calibration_losses(batches, loss_of)
        own = decide(False)
        if release is not None:
            release()
        own_losses = engine.calibration_losses(batches, loss_of)
        keep_veto, error = probe_wins(vetoed_losses, own_losses)
        if keep_veto:
            reapply(vetoed)
    report = {"kept": probe_label if keep_veto else "strategy", "veto_loss": float(vetoed_losses.mean()),
              "strategy_loss": float(own_losses.mean()), "difference_se": error}
    return (vetoed if keep_veto else own), report


def _by_weight_copies(engine: ProbeEngine, names, batches: list, loss_of: LossOfBatch,
                      decide: Callable[[bool], Result], release: Callable[[], None] | None):
    """Both decisions from the original weights first, then both forward passes: besides the
    live weights, one copy at a time is held while the batches run (the winner's is written
    back), and ``release`` frees what the decisions needed before any batch runs."""
    originals = engine.weights_copy(names)
    vetoed = decide(True)
    vetoed_weights = engine.weights_copy(names)
    engine.put_weights(originals)
    del originals
    own = decide(False)
    if release is not None:
        release()
    own_losses = engine.calibration_losses(batches, loss_of)
    own_weights = engine.weights_copy(names)
    engine.put_weights(vetoed_weights)
    del vetoed_weights
    vetoed_losses = engine.calibration_losses(batches, loss_of)
    keep_veto, error = probe_wins(vetoed_losses, own_losses)
    if not keep_veto:
        engine.put_weights(own_weights)
    return vetoed, own, vetoed_losses, own_losses, keep_veto, error
