"""Target mode: the strategy's own order, with the probe as a veto.

Ranking the candidates by gradient ratio alone throws away everything the strategy knows
(Wanda's |w| * ||x|| per row) and trusts a ratio measured with most of each row scaled down
at once: on SmolLM2-135M at 50% that point costs +2 nats of calibration loss, so the ratio
reflects the whole network's collapse more than each weight (measured: ratio-only target
mode 202.8 perplexity where Wanda gives 85.6). So target mode keeps the strategy's order
and its own rule (per row, per layer, global, per N:M group) and only moves the candidates
the probe vetoes (``probe.veto``: those whose gradient grew most) after every other
candidate; the quota is filled with the next weights in the strategy's order. With no
veto the masks are exactly the strategy's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradprobe_dist.parallel.base import Backend


@dataclass(frozen=True)
class StrategyOrder:
    """A scored strategy's view for the decision: its scores of the original weights (local
    parts, lower = pruned first) and its rule, ``select(scores, sparsity) -> masks``."""

    scores: dict[str, torch.Tensor]
    select: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]]


def veto_last(backend: Backend, scores: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor],
              vetoed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The strategy's ``scores`` with every vetoed candidate shifted after every unvetoed one
    (the same shift on every rank, so their own order is kept up to float32 rounding) and
    every non-candidate at +inf, so a selection of at most the candidates' count never takes one."""
    spans = [torch.stack([s[c].max(), -s[c].min()]).double().cpu() for s, c in
             ((scores[n].float(), candidates[n]) for n in scores) if bool(c.any())]
    span = torch.stack(spans).max(0).values if spans else torch.zeros(2, dtype=torch.float64)
    span = backend.all_reduce(span.to(backend.device), "max")
    shift = float(span[0] + span[1]) + 1.0  # > max - min: a shifted score exceeds every unshifted one
    return {n: torch.where(candidates[n], scores[n].float() + shift * vetoed[n].float(),
                           torch.full_like(scores[n], float("inf"), dtype=torch.float32))
            for n in scores}


def in_strategy_order(backend: Backend, order: StrategyOrder, candidates: dict[str, torch.Tensor],
                      vetoed: dict[str, torch.Tensor] | None, sparsity: float) -> dict[str, torch.Tensor]:
    """Exactly the strategy's quota at ``sparsity``, vetoed candidates last (None: no veto)."""
    vetoed = vetoed or {n: torch.zeros_like(c) for n, c in candidates.items()}
    chosen = order.select(veto_last(backend, order.scores, candidates, vetoed), sparsity)
    return {n: chosen[n].to(c.device) & c for n, c in candidates.items()}
