"""Comparing pruners fairly: at the same actual sparsity, counted from the weights themselves.

A pruner that stops short of its target (GradProbe's threshold mode keeps part of what it
selects) would look better than one that reaches it; so every comparison row records the
sparsity it actually has, and baselines are re-run at the probe's actual sparsity:

    names = list(find_prunable(model))
    pruned = gradprobe_prune(copy.deepcopy(model))
    reached = actual_sparsity(pruned, names)[0]
    rows = [row("GradProbe", pruned, names, evaluate)]
    rows += at_sparsity(reached, {"Wanda": wanda_prune, "SparseGPT": sparsegpt_prune}, names, evaluate)
    assert sparsity_gap(rows) <= 1 / 32   # a baseline rounds its counts per row or block

``prune`` callables take the sparsity and return a pruned copy of the model.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from gradprobe_dist.strategies.base import parse_pattern


def actual_sparsity(model: nn.Module, names: list[str]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros over the weights ``names``, and per weight."""
    params = dict(model.named_parameters())
    zeros = {n: int((params[n] == 0).sum()) for n in names}
    total = sum(params[n].numel() for n in names)
    return sum(zeros.values()) / total, {n: zeros[n] / params[n].numel() for n in names}


def follows_pattern(model: nn.Module, names: list[str], pattern: str) -> bool:
    """True when every group of M consecutive inputs of every row holds at least N zeros
    (what semi-structured kernels need), judged from the weights themselves."""
    n, m = parse_pattern(pattern)
    params = dict(model.named_parameters())
    return all(bool(((params[name].reshape(params[name].shape[0], -1, m) == 0).sum(-1) >= n).all())
               for name in names)


def row(method: str, model: nn.Module, names: list[str], evaluate: Callable[[nn.Module], float],
        **extra) -> dict:
    """One comparison row: the method, its model's actual sparsity and metric."""
    return {"method": method, "sparsity": actual_sparsity(model, names)[0], "metric": evaluate(model), **extra}


def at_sparsity(sparsity: float, prune: dict[str, Callable[[float], nn.Module]], names: list[str],
                evaluate: Callable[[nn.Module], float], **extra) -> list[dict]:
    """Every method of ``prune`` asked for ``sparsity`` (e.g. the probe's actual sparsity)."""
    return [row(method, make(sparsity), names, evaluate, requested=sparsity, **extra)
            for method, make in prune.items()]


def sparsity_gap(rows: list[dict]) -> float:
    """The largest difference of actual sparsity between any two rows (0 for equal ones)."""
    values = [r["sparsity"] for r in rows]
    return max(values) - min(values) if values else 0.0
