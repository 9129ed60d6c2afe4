"""Iterative pruning: reach the target sparsity over several probe rounds, optionally
fine-tuning in between (gradual pruning, Zhu & Gupta 2017, arXiv:1710.01878).

Round r = 1..k brings the pruned fraction to the schedule value s_r *of all* prunable
weights: cubic ``s_r = s_f + (0 - s_f)(1 - r/k)^3`` prunes fast while many redundant weights
remain and slowly near the end; linear ``s_r = s_f r/k``. Weights pruned in earlier rounds
stay pruned. They are zero, so magnitude and Wanda select them first again: harmless,
since scaling zero changes nothing and a round decides only among its *alive* candidates.

* ``mode="target"``: the strategy selects ``s_(r-1) + oversample (s_r - s_(r-1))`` of the
  weights (the zeros plus the smallest alive ones: the round's increment, oversampled). With
  a scored strategy (magnitude, Wanda) the round then takes the strategy's own quota at s_r
  by its own rule, in its order of the current weights, the probe's vetoed candidates last,
  as one-shot target mode does (``gradprobe_dist.probe.target``). A strategy without scores
  falls back to the alive candidates with the lowest gradient ratio new/old until exactly
  ``floor(s_r numel)`` weights are pruned per layer (or over all layers with
  ``target_scope="global"``); one that does not re-select the zeros (random) offers fewer
  alive candidates, a shortfall logged and shown in the rows.
* ``mode="threshold"``: the probe selects s_r; alive candidates whose gradient did not grow
  by more than ``gradient_threshold`` are pruned, so a round ends at or below s_r.

``run_rounds`` is the one round loop, for the library's ``iterative_prune`` (iterative.py)
and the pipeline's ``PruneJob`` (stages.py) alike. Both write rounds in one format:
``ROOT/round-NNN/`` is a mask checkpoint of every mask after round r, its config the run's
plus ``round``, each layer's stats from ``round_stats``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from gradprobe_dist.checkpoint.format import CARRIED_KEY, ROUND_KEY
from gradprobe_dist.checkpoint.relay import RankZeroCheckpoint
from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.pipeline.plots import ratio_tensor
from gradprobe_dist.probe.decision import candidates_first
from gradprobe_dist.probe.record import LayerProbe, ProbeRecord, prune_decision
from gradprobe_dist.probe.target import StrategyOrder, in_strategy_order
from gradprobe_dist.probe.validation import is_int, is_number
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.strategies.base import count_to_select

log = get_logger(__name__)

SCHEDULES = ("cubic", "linear")


def schedule_values(target: float, rounds: int, kind: str = "cubic") -> list[float]:
    """Sparsity after each round 1..``rounds``, from 0 up to exactly ``target``."""
    if not is_number(target):
        raise TypeError(f"target must be a number, got {type(target).__name__}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target={target} is outside (0, 1): pass the sparsity the last round "
                         "reaches, e.g. 0.8 for 80%")
    if not is_int(rounds) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be an int >= 1 (1 = one-shot pruning)")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is unknown: use 'cubic' (Zhu & Gupta) or 'linear'")
    if kind == "linear":
        return [target * r / rounds for r in range(1, rounds + 1)]
    return [target + (0.0 - target) * (1 - r / rounds) ** 3 for r in range(1, rounds + 1)]


# -- the round loop ----------------------------------------------------------------------------
@dataclass
class Round:
    """One round: prune to ``sparsity`` with the strategy selecting ``oversample`` x sparsity
    of each layer. ``previous`` is the checkpoint of the round before (None in round 1)."""

    number: int
    count: int
    sparsity: float
    oversample: float
    previous: RankZeroCheckpoint | None = None

    @property
    def label(self) -> str:
        return f"round {self.number}/{self.count}, " if self.count > 1 else ""


def plan_rounds(target: float, count: int, schedule: str, oversample: float) -> list[Round]:
    """The rounds of a schedule; ``oversample`` applies to each round's increment."""
    values = schedule_values(target, count, schedule)
    return [Round(number, count, sparsity, max(1.0, tentative_fraction(values, number, oversample) / sparsity))
            for number, sparsity in enumerate(values, start=1)]


def round_dir(root: str | Path, number: int) -> Path:
    return Path(root) / f"round-{number:03d}"


class RoundSteps(Protocol):
    """What a caller of ``run_rounds`` provides (the library and the pipeline)."""

    def open_round(self, round_: Round, restart: bool) -> RankZeroCheckpoint | None: ...
    def is_done(self, round_: Round, store: RankZeroCheckpoint | None) -> bool: ...
    def load(self, store: RankZeroCheckpoint) -> None: ...
    def run(self, round_: Round, store: RankZeroCheckpoint | None) -> None: ...


def run_rounds(rounds: list[Round], steps: RoundSteps, restart: bool
               ) -> list[tuple[Round, RankZeroCheckpoint | None, bool]]:
    """Every round in order: one found done on disk is skipped, and the model is brought to
    the last skipped round's state (``steps.load``) only when a later round has to run, or
    at the end. A round that runs makes every later round start over (``restart``), since
    what is on disk for them was built on other masks. Returns (round, store, resumed)."""
    previous, applied, recompute, out = None, True, restart, []
    for round_ in rounds:
        store = steps.open_round(round_, recompute)
        resumed = steps.is_done(round_, store)
        if not resumed:
            if not applied:  # the model must hold the previous round's masks
                steps.load(previous)
            round_.previous = previous
            steps.run(round_, store)
            recompute = True
        applied, previous = not resumed, store
        out.append((round_, store, resumed))
    if not applied:
        steps.load(previous)
    return out


def round_stats(counts: dict[str, int], seconds: float, number: int | None) -> dict[str, Any]:
    """A layer's checkpoint stats after a round (``number`` None: one-shot pruning): the alive
    candidates it decided about (``tentative``), those it kept (``restored``) and the weights
    pruned before it (``carried``), so ``pruned = carried + tentative - restored``."""
    stats = {"tentative": counts["candidates"], "restored": counts["candidates"] - counts["newly_pruned"],
             "seconds": round(seconds, 4)}
    if number is not None:
        stats.update({ROUND_KEY: number, CARRIED_KEY: counts["carried"]})
    return stats


def decided_ratios(record: ProbeRecord, before: dict[str, torch.Tensor]
                   ) -> dict[str, Callable[[], torch.Tensor]]:
    """Per weight, a call that makes its gradient ratios of the weights this round decided
    about (NaN elsewhere, carried weights included), for plots: a local part, gathered by the
    checkpoint store. Made as each layer is saved, never all at once: at four bytes per
    weight, all of them at once were the whole job's peak memory in bfloat16."""
    return {n: partial(_decided_ratio, layer, before[n]) for n, layer in record.layers.items()}


def _decided_ratio(layer: LayerProbe, before: torch.Tensor) -> torch.Tensor:
    ratio = ratio_tensor(layer)
    return ratio.masked_fill_(before.to(ratio.device), float("nan"))


def without_nan(ratio: torch.Tensor) -> torch.Tensor:
    return ratio.masked_select(~ratio.isnan())  # the ratios of the decided weights, as saved


def tentative_fraction(values: list[float], number: int, oversample: float) -> float:
    """What the strategy selects in round ``number``: last round's zeros plus ``oversample``
    times this round's increment, ``s_(r-1) + oversample (s_r - s_(r-1))`` (capped at 1).
    Oversampling all of s_r instead would soon scale every weight at once, and a network
    scaled everywhere tells little about any one weight."""
    previous = values[number - 2] if number > 1 else 0.0
    return min(1.0, previous + oversample * (values[number - 1] - previous))


def round_masks(backend: Backend, record: ProbeRecord, pruned: dict[str, torch.Tensor],
                sparsity: float, mode: str, gradient_threshold: float,
                scope: str = "layer", order: StrategyOrder | None = None,
                vetoes: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The masks after one round: ``pruned`` (earlier rounds) plus the alive tentative weights
    chosen by the round's rule (see the module docstring): in target mode with the strategy's
    ``order`` (``GradProbe.target_order``), its quota at ``sparsity`` with the pruned weights
    first and the alive ``vetoes`` last. All tensors are local parts."""
    if mode == "target" and order is not None:
        return _in_strategy_order(backend, record, pruned, sparsity, order, vetoes)
    names = list(record.layers)
    alive = {n: ~pruned[n][layer.tentative] for n, layer in record.layers.items()}
    if mode == "threshold":
        chosen = [alive[n] & prune_decision(layer.old, layer.new, gradient_threshold)
                  .to(alive[n].device) for n, layer in record.layers.items()]
    else:
        counts = backend.sum_over_shards(torch.tensor(
            [[int(pruned[n].count_nonzero()), int(alive[n].count_nonzero())] for n in names], dtype=torch.float64))
        carried, candidates = counts[:, 0].long().tolist(), counts[:, 1].long().tolist()
        numels = [backend.local_slice(n).full_numel for n in names]
        # already-pruned weights rank after every alive candidate, even one whose ratio is inf
        scores = [candidates_first(layer.ratio(), alive[n]) for n, layer in record.layers.items()]
        if scope == "global":
            wanted = [count_to_select(sum(numels), sparsity) - sum(carried)]
            available = [sum(candidates)]
        else:
            wanted = [count_to_select(numel, sparsity) - c for numel, c in zip(numels, carried)]
            available = candidates
        ks = [min(max(w, 0), a) for w, a in zip(wanted, available)]
        if backend.is_main and ks != [max(w, 0) for w in wanted]:
            log.warning("the strategy offered too few alive candidates to reach sparsity %.4g: "
                        "raise oversample, or use a strategy that selects the pruned zeros "
                        "first (magnitude, wanda)", sparsity)
        chosen = (backend.select_smallest(scores, ks[0]) if scope == "global"
                  else backend.select_smallest_each(scores, ks))
    return {n: pruned[n] | layer.expand(c) for (n, layer), c in zip(record.layers.items(), chosen)}


def _in_strategy_order(backend: Backend, record: ProbeRecord, pruned: dict[str, torch.Tensor], sparsity: float,
                       order: StrategyOrder, vetoes: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Target mode's round in the strategy's order: the earlier rounds' zeros scored below
    every other weight (so the quota keeps them, whatever the strategy thinks of a zero),
    the alive candidates in the strategy's order, vetoed ones last."""
    low = min((float(s.min()) for s in order.scores.values() if s.numel()), default=0.0)
    low = float(backend.all_reduce(torch.tensor([low], dtype=torch.float64, device=backend.device), "min")) - 1.0
    scores = {n: torch.where(pruned[n].to(s.device), torch.full_like(s, low), s) for n, s in order.scores.items()}
    candidates = {n: layer.tentative | pruned[n] for n, layer in record.layers.items()}
    alive_vetoes = None if vetoes is None else {n: v & ~pruned[n] for n, v in vetoes.items()}
    chosen = in_strategy_order(backend, StrategyOrder(scores, order.select), candidates, alive_vetoes, sparsity)
    return {n: pruned[n] | chosen[n] for n in record.layers}


def layer_counts(backend: Backend, record: ProbeRecord, before: dict[str, torch.Tensor],
                 after: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """Per layer (over all ranks): ``numel``, ``carried`` (pruned before the round),
    ``candidates`` (alive tentative weights) and ``newly_pruned``."""
    names = list(record.layers)
    local = torch.tensor([[int(before[n].count_nonzero()), int((~before[n] & layer.tentative).count_nonzero()),
                           int((after[n] & ~before[n]).count_nonzero())]
                          for n, layer in record.layers.items()], dtype=torch.float64)
    totals = backend.sum_over_shards(local).long().tolist()
    return {n: {"numel": backend.local_slice(n).full_numel, "carried": c, "candidates": a,
                "newly_pruned": p} for n, (c, a, p) in zip(names, totals)}
