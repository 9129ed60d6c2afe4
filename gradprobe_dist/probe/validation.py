"""Argument checks shared by the Python API and the YAML configs: one message per mistake."""
from __future__ import annotations

import math

MODES = ("threshold", "target", "sparsegpt")
TARGET_SCOPES = ("layer", "global")


def is_int(value) -> bool:
    """True for an int that is not a bool (``True`` is an ``int`` to Python, never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_prune_args(sparsity: float, num_batches: int, reduction_factor: float,
                     gradient_threshold: float) -> None:
    """Raise ValueError/TypeError naming the bad argument and what would be valid."""
    check_selection_args(sparsity, num_batches)
    _number("reduction_factor", reduction_factor)
    if not 0.0 < reduction_factor < 1.0:
        raise ValueError(f"reduction_factor={reduction_factor} is outside (0, 1): selected "
                         "weights are scaled by it, e.g. 0.1 keeps 10% of their value")
    check_threshold(gradient_threshold)


def check_selection_args(sparsity: float, num_batches: int) -> None:
    """What every prune checks, with or without the probe's passes."""
    _number("sparsity", sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1): pass the fraction of weights "
                         "to prune, e.g. 0.5 for 50%")
    if not is_int(num_batches):
        raise TypeError(f"num_batches must be an int, got {type(num_batches).__name__}")
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1: the probe needs at least "
                         "one calibration batch")


def check_threshold(gradient_threshold: float) -> None:
    _number("gradient_threshold", gradient_threshold)
    if gradient_threshold < 0:
        raise ValueError(f"gradient_threshold={gradient_threshold} is negative: use 0.0 to "
                         "prune only weights whose gradient did not grow, or a positive "
                         "tolerance such as 0.1")


def check_mode(mode: str, oversample: float, target_scope: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'threshold' (prune what the probe "
                         "finds redundant), 'target' (reach the sparsity exactly) or 'sparsegpt' "
                         "(SparseGPT's mask, the probe as a veto)")
    if not is_number(oversample) or oversample < 1.0:
        raise ValueError(f"oversample={oversample!r} must be a number >= 1: the target mode "
                         "probes oversample x sparsity candidates and keeps the best")
    if target_scope not in TARGET_SCOPES:
        raise ValueError(f"target_scope={target_scope!r} is unknown: use 'layer' or 'global'")


def check_guard(mode: str, strategy_name: str, scored: bool, nm: tuple[int, int] | None) -> None:
    """The guard compares the probe's decision with the strategy's own masks: it needs those
    masks in the strategy's own order (scores), and in threshold mode at the lower sparsity
    the probe reached, which an N:M pattern cannot express."""
    check_mode(mode, 1.0, "layer")
    if mode != "sparsegpt" and not scored:
        raise ValueError(f"guard needs the strategy's own order, but {strategy_name} gives no scores: "
                         "implement scores() (see ScoredStrategy) or drop guard")
    if mode == "threshold" and nm:
        raise ValueError(f"guard in threshold mode compares with the strategy at the sparsity the probe "
                         f"reached, which the {nm[0]}:{nm[1]} pattern cannot express: use mode='target' "
                         "(exact N:M) or drop guard")


def _number(name: str, value) -> None:
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not finite")
