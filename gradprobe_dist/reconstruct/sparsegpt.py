"""SparseGPT's adaptive mask (Frantar & Alistarh, 2023), for several layers at once, with an
optional veto, as pure tensor math.

The mask is chosen inside the OBS sweep (``obs.py``), from weights already updated by the
columns before, with the score ``w^2 / [H^-1]_jj^2`` (the error pruning ``w`` adds):

* unstructured: at the start of every block of ``blocksize`` columns, exactly
  ``floor(sparsity * rows * width)`` weights of the block's tile, the lowest scores;
* N:M: when the sweep reaches a group of ``m`` columns, the ``n`` lowest of each row.

A veto (True = keep if at all possible; e.g. weights whose gradient grew when GradProbe
scaled them down) ranks a weight after every unvetoed one of its tile or group, so the quota
is filled by the next-best weights in SparseGPT's own order, vetoed ones only when too few
others remain. Ties go to the lower (row, column) in row-major order.

Rows never mix given ``H``, so each rank can sweep its own rows of a weight; only the tile
quota spans rows. ``select_each`` (exact k smallest of each tensor over all ranks, as
``Backend.select_smallest_each``) and ``sum_counts`` (a count summed over ranks, as
``Backend.sum_over_shards``) are the only collectives, one selection per block for all layers
together; their one-process defaults make this plain SparseGPT. With those, rank r holding
the r-th contiguous rows gets exactly the rows one process holding the whole weight gets.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gradprobe_dist.parallel.select import select_smallest_each
from gradprobe_dist.probe.validation import is_number
from gradprobe_dist.reconstruct.obs import STEP, InverseFactor, check_args, obs_block, prepare
from gradprobe_dist.strategies.base import count_to_select

SelectEach = Callable[[list[torch.Tensor], list[int]], list[torch.Tensor]]
SumCounts = Callable[[torch.Tensor], torch.Tensor]


def select_locally(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    return select_smallest_each(scores, ks)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                    percdamp: float = 0.01, prune_n: int = 0, prune_m: int = 0,
                    veto: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W [out, in]`` to ``sparsity`` (or ``prune_n`` of every ``prune_m``) and update
    the rest; return ``(W_new, mask)``, ``mask`` True where ``W_new`` is zero by pruning. It
    also holds the weights of inputs never active during calibration (zero diagonal of
    ``H``), which are zeroed as in the reference. ``veto``: bool like ``W`` (see the module)."""
    nm = (prune_n, prune_m) if prune_n or prune_m else None
    return sparsegpt_layers([W], [H], sparsity, nm=nm, vetoes=[veto], blocksize=blocksize,
                            percdamp=percdamp)[0]


def sparsegpt_layers(weights: Sequence[torch.Tensor], hessians: Sequence[torch.Tensor | InverseFactor],
                     sparsity: float = 0.5, *, nm: tuple[int, int] | None = None,
                     vetoes: Sequence[torch.Tensor | None] | None = None, blocksize: int = 128,
                     percdamp: float = 0.01, select_each: SelectEach = select_locally,
                     sum_counts: SumCounts = lambda counts: counts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SparseGPT on every ``weights[i]`` (this rank's rows ``[r, in]``) with its ``hessians[i]``
    (the whole ``[in, in]``, or its ``InverseFactor``), column blocks in lockstep; returns
    ``(W_new, mask)`` per layer.

    A collective when ``select_each``/``sum_counts`` are: every rank passes the same layers
    in the same order, ``vetoes[i]`` None on every rank or on none.
    """
    vetoes = list(vetoes) if vetoes is not None else [None] * len(weights)
    if len(hessians) != len(weights) or len(vetoes) != len(weights):
        raise ValueError(f"got {len(weights)} weights, {len(hessians)} Hessians and {len(vetoes)} "
                         "vetoes: pass one Hessian (and one veto or None) per weight")
    _check_pattern(weights, sparsity, nm, blocksize)
    sweeps = [_Sweep(W, H, v, percdamp, blocksize) for W, H, v in zip(weights, hessians, vetoes)]
    rows = sum_counts(torch.tensor([s.weights.shape[0] for s in sweeps], dtype=torch.float64))
    for b in range(max((s.blocks for s in sweeps), default=0)):
        active = [(s, int(r)) for s, r in zip(sweeps, rows.tolist()) if b < s.blocks]
        if nm is None:
            _choose_tiles([s for s, _ in active], b, [count_to_select(r * s.width(b), sparsity)
                                                      for s, r in active], select_each, sum_counts)
        for s, _ in active:
            s.sweep_block(b, nm)
    return [(s.weights.to(W.dtype), s.mask | s.dead) for s, W in zip(sweeps, weights)]


class _Sweep:
    """One layer between column blocks: its working weights, H^-1 factor, mask and veto."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor | InverseFactor, veto: torch.Tensor | None,
                 percdamp: float, blocksize: int):
        check_args(W, H, blocksize, percdamp)
        if veto is not None and (veto.shape != W.shape or veto.dtype != torch.bool):
            raise ValueError(f"veto must be a bool tensor of W's shape {list(W.shape)}, got "
                             f"{veto.dtype} {list(veto.shape)}")
        self.weights, self.hinv, self.dead = prepare(W, H, percdamp)
        self.veto = None if veto is None else veto.to(self.weights.device) & ~self.dead
        self.mask = torch.zeros(self.weights.shape, dtype=torch.bool, device=self.weights.device)
        self.blocksize = blocksize
        self.blocks = math.ceil(self.weights.shape[1] / blocksize)

    def columns(self, b: int) -> tuple[int, int]:
        return b * self.blocksize, min((b + 1) * self.blocksize, self.weights.shape[1])

    def width(self, b: int) -> int:
        i1, i2 = self.columns(b)
        return i2 - i1

    def tile(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of block ``b`` at its start, and its veto."""
        i1, i2 = self.columns(b)
        scores = self.weights[:, i1:i2] ** 2 / torch.diag(self.hinv)[i1:i2] ** 2
        return scores, None if self.veto is None else self.veto[:, i1:i2]

    def sweep_block(self, b: int, nm: tuple[int, int] | None) -> None:
        i1, i2 = self.columns(b)
        if nm is None:
            obs_block(self.weights, self.hinv, self.mask, i1, i2)
            return
        n, m = nm
        veto = None if self.veto is None else self.veto[:, i1:i2]
        # a group's scores need the group updated by every column before it: whole groups per step
        obs_block(self.weights, self.hinv, self.mask, i1, i2, _group_chooser(n, m, veto),
                  step=m * math.ceil(STEP / m))


def _choose_tiles(sweeps: list[_Sweep], b: int, ks: list[int], select_each: SelectEach,
                  sum_counts: SumCounts) -> None:
    """Mark the ``ks[i]`` lowest scores of each layer's tile ``b`` over all ranks, vetoed
    entries after every unvetoed one: first among the unvetoed, then, where they fall
    short, among the vetoed. Two selections only when a veto is given."""
    tiles = [s.tile(b) for s in sweeps]
    inf = float("inf")
    if all(veto is None for _, veto in tiles):
        picked = select_each([scores for scores, _ in tiles], ks)
    else:
        vetoes = [veto if veto is not None else torch.zeros_like(scores, dtype=torch.bool)
                  for scores, veto in tiles]
        free = sum_counts(torch.tensor([float((~v).count_nonzero()) for v in vetoes], dtype=torch.float64))
        first = [min(k, int(f)) for k, f in zip(ks, free.tolist())]
        picked = select_each([s.masked_fill(v, inf) for (s, _), v in zip(tiles, vetoes)], first)
        rest = [k - f for k, f in zip(ks, first)]
        if any(rest):  # the same on every rank: counts are global
            extra = select_each([s.masked_fill(~v, inf) for (s, _), v in zip(tiles, vetoes)], rest)
            picked = [p | e for p, e in zip(picked, extra)]
    for s, p in zip(sweeps, picked):
        i1, i2 = s.columns(b)
        s.mask[:, i1:i2] = p


def lowest_in_rows(scores: torch.Tensor, n: int, veto: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the ``n`` lowest scores of each row of ``scores [rows, m]``, vetoed entries
    after every unvetoed one, ties to the lower column."""
    order = torch.sort(scores, dim=1, stable=True).indices
    if veto is not None:  # a stable sort by the veto flag keeps the score order within each
        order = order.gather(1, torch.sort(veto.gather(1, order).to(torch.uint8), dim=1,
                                           stable=True).indices)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :n], True)


def _group_chooser(n: int, m: int, veto: torch.Tensor | None):
    """``obs_block``'s hook picking N of each M columns when the sweep reaches them."""
    def choose(block, hinv1, block_mask, i):
        if i % m == 0:
            scores = block[:, i:i + m] ** 2 / torch.diag(hinv1)[i:i + m] ** 2
            group_veto = None if veto is None else veto[:, i:i + m]
            block_mask[:, i:i + m] |= lowest_in_rows(scores, n, group_veto)
    return choose


def _check_pattern(weights: Sequence[torch.Tensor], sparsity: float, nm: tuple[int, int] | None,
                   blocksize: int) -> None:
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"N:M pruning needs 0 < prune_n < prune_m, got {n}:{m}; "
                             "e.g. prune_n=2, prune_m=4 (or both 0 for unstructured)")
        for W in weights:
            if W.dim() == 2 and (W.shape[1] % m or blocksize % m):
                raise ValueError(f"N:M groups of {m} must tile the {W.shape[1]} input columns and "
                                 f"blocksize={blocksize}: pick prune_m dividing both")
    elif not is_number(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1): pass the fraction to prune, e.g. 0.5")
