"""SparseGPT (Frantar & Alistarh, 2023) for one Linear weight, as pure tensor functions.

Pruning weight ``W[:, j]`` of a layer whose calibration inputs are ``X`` (columns = tokens)
raises the layer's squared output error ``||W X - W' X||^2`` by ``w_j^2 / [H^-1]_jj`` when
the not-yet-processed weights of the row absorb it with the Optimal Brain Surgeon update
``delta = -(w_j / [H^-1]_jj) * H^-1[j, :]``, where ``H = 2 X X^T``. SparseGPT visits the
columns left to right, so one Cholesky factor of ``H^-1`` serves every row, and:

* chooses the mask per block of ``blocksize`` columns (unstructured: the lowest
  ``w^2 / [H^-1]_jj^2`` in the block; N:M: the lowest ``prune_n`` of every ``prune_m``
  consecutive columns of a row), using weights already updated by earlier columns;
* zeroes the chosen weights one column at a time and pushes the error into later
  columns: inside the block at once, and into the following columns lazily, once per block.

``reconstruct_with_mask`` runs the same update with a mask chosen elsewhere (e.g. by
GradProbe), so the surviving weights compensate for the pruned ones.
"""
from __future__ import annotations

import math

import torch

from gradprobe_dist.strategies.base import count_to_select


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n_seen: int) -> int:
    """Fold inputs ``x [..., in]`` into ``H`` (in place) and return the new sample count.

    ``H`` holds the running mean of ``2 x x^T`` over every input row seen so far (each token
    of a sequence is a row), so batches of any size add up to the same matrix. Its scale
    does not change what SparseGPT prunes; the mean keeps float32 sums well-conditioned.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != x.shape[-1]:
        raise ValueError(f"H of shape {list(H.shape)} does not fit inputs with {x.shape[-1]} "
                         "features: start from torch.zeros(in_features, in_features)")
    rows = x.reshape(-1, x.shape[-1]).to(H.dtype)
    total = n_seen + rows.shape[0]
    if total == 0:
        return 0
    H.mul_(n_seen / total).addmm_(rows.T, rows, alpha=2.0 / total)
    return total


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                    percdamp: float = 0.01, prune_n: int = 0,
                    prune_m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W [out, in]`` to ``sparsity`` and update the rest; return ``(W_new, mask)``.

    Unstructured: exactly ``floor(sparsity * out * width)`` weights of each column block of
    ``width`` (<= ``blocksize``) columns. N:M (``prune_n``/``prune_m`` > 0, ``sparsity``
    ignored): ``prune_n`` of every ``prune_m`` consecutive weights of a row. ``mask`` is True
    where ``W_new`` is zero by pruning; it also holds the weights of inputs that were never
    active during calibration (zero diagonal of ``H``), which are zeroed as in the reference.
    """
    _check_args(W, H, blocksize, percdamp)
    if prune_n or prune_m:
        if not 0 < prune_n < prune_m:
            raise ValueError(f"N:M pruning needs 0 < prune_n < prune_m, got {prune_n}:{prune_m}; "
                             "e.g. prune_n=2, prune_m=4 (or both 0 for unstructured)")
        if W.shape[1] % prune_m or blocksize % prune_m:
            raise ValueError(f"N:M groups of {prune_m} must tile the {W.shape[1]} input columns and "
                             f"blocksize={blocksize}: pick prune_m dividing both")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is outside [0, 1): pass the fraction to prune, e.g. 0.5")
    weights, hinv, dead = _prepare(W, H, percdamp)
    mask = torch.zeros(weights.shape, dtype=torch.bool, device=weights.device)
    for i1 in range(0, weights.shape[1], blocksize):
        i2 = min(i1 + blocksize, weights.shape[1])
        if not prune_n:
            scores = weights[:, i1:i2] ** 2 / torch.diag(hinv)[i1:i2] ** 2
            lowest = torch.topk(scores.flatten(), count_to_select(scores.numel(), sparsity), largest=False)
            block_mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
            mask[:, i1:i2] = block_mask.index_fill_(0, lowest.indices, True).view_as(scores)
        _obs_block(weights, hinv, mask, i1, i2, prune_n, prune_m)
    mask |= dead
    return weights.to(W.dtype), mask


def reconstruct_with_mask(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor,
                          blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Zero ``W`` where ``mask`` is True and let the other weights absorb the output error.

    The OBS update of SparseGPT with the mask held fixed: masked entries come back exactly
    zero, the others move to reduce ``||W X - W_new X||`` on the calibration inputs.
    Weights of never-active inputs are left as they are unless masked.
    """
    _check_args(W, H, blocksize, percdamp)
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of W's shape {list(W.shape)}, got "
                         f"{mask.dtype} {list(mask.shape)}")
    weights, hinv, _ = _prepare(W, H, percdamp, zero_dead=False)
    mask = mask.to(weights.device)
    for i1 in range(0, weights.shape[1], blocksize):
        _obs_block(weights, hinv, mask, i1, min(i1 + blocksize, weights.shape[1]))
    return weights.to(W.dtype)


def _check_args(W: torch.Tensor, H: torch.Tensor, blocksize: int, percdamp: float) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a Linear weight [out, in], got shape {list(W.shape)}; "
                         "flatten conv weights to [out, -1] and build H from unfolded inputs")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H has shape {list(H.shape)} but W has {W.shape[1]} input columns: "
                         "accumulate H from this layer's inputs with accumulate_hessian")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} must be a positive int, e.g. 128")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp={percdamp!r} must be a finite number >= 0, e.g. 0.01")


def _prepare(W: torch.Tensor, H: torch.Tensor, percdamp: float,
             zero_dead: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copy of W, the upper Cholesky factor of the damped H^-1, dead-input mask."""
    weights = W.detach().float().clone()
    H = H.detach().to(weights.device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # an input never seen: no error couples it to the others
    if zero_dead:
        weights[:, dead] = 0.0
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    factor, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError("the damped Hessian is not positive definite: raise percdamp (e.g. 0.1) "
                         "or use more calibration samples")
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    dead_mask = dead.unsqueeze(0).expand_as(weights) if zero_dead else torch.zeros_like(weights, dtype=torch.bool)
    return weights, hinv, dead_mask


def _obs_block(weights: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, i1: int, i2: int,
               prune_n: int = 0, prune_m: int = 0) -> None:
    """Prune columns ``i1:i2`` in place, one at a time, then push their error onwards.

    With ``prune_n`` the mask of each group of ``prune_m`` columns is chosen when the loop
    reaches the group, from the weights as updated so far (the N:M rule of SparseGPT).
    """
    block = weights[:, i1:i2]  # a view: updates land in ``weights``
    hinv1 = hinv[i1:i2, i1:i2]
    block_mask = mask[:, i1:i2]
    errors = torch.zeros_like(block)
    for i in range(i2 - i1):
        if prune_n and i % prune_m == 0:
            group = block[:, i:i + prune_m] ** 2 / torch.diag(hinv1)[i:i + prune_m] ** 2
            picked = torch.topk(group, prune_n, dim=1, largest=False).indices
            block_mask[:, i:i + prune_m].scatter_(1, picked, True)
        w = block[:, i]
        err = torch.where(block_mask[:, i], w, torch.zeros_like(w)) / hinv1[i, i]
        block[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
        block[:, i].masked_fill_(block_mask[:, i], 0.0)  # exactly zero, not a rounding residue
        errors[:, i] = err
    weights[:, i2:] -= errors @ hinv[i1:i2, i2:]
