"""The Optimal-Brain-Surgeon math of SparseGPT (Frantar & Alistarh, 2023) for one Linear
weight, as pure tensor functions.

Pruning weight ``W[:, j]`` of a layer whose calibration inputs are ``X`` (columns = tokens)
raises the layer's squared output error ``||W X - W' X||^2`` by ``w_j^2 / [H^-1]_jj`` when
the not-yet-processed weights of the row absorb it with the Optimal Brain Surgeon update
``delta = -(w_j / [H^-1]_jj) * H^-1[j, :]``, where ``H = 2 X X^T``. SparseGPT visits the
columns left to right, so one Cholesky factor of ``H^-1`` serves every row: it zeroes the
pruned weights one column at a time and pushes the error into later columns, inside a
block of columns at once and into the following columns lazily, once per block.

``reconstruct_with_mask`` runs that update with a mask chosen elsewhere (e.g. by GradProbe),
so the surviving weights compensate for the pruned ones; ``sparsegpt.py`` chooses the mask
inside the sweep, as SparseGPT does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradprobe_dist.probe.validation import is_int
from gradprobe_dist.reconstruct.triangle import pack_lower, packed_size

#: columns whose errors go one by one into each other (see ``obs_block``)
STEP = 16


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n_seen: int) -> int:
    """Fold inputs ``x [..., in]`` into ``H`` (in place) and return the new sample count.

    ``H`` holds the running mean of ``2 x x^T`` over every input row seen so far (each token
    of a sequence is a row), so batches of any size add up to the same matrix. Its scale
    does not change what SparseGPT prunes; the mean keeps float32 sums well-conditioned.
    ``H`` is the whole ``[in, in]`` matrix, or its lower triangle packed (``triangle``).
    """
    features = x.shape[-1]
    packed = H.dim() == 1
    if H.shape != ((packed_size(features),) if packed else (features, features)):
        raise ValueError(f"H of shape {list(H.shape)} does not fit inputs with {features} "
                         "features: start from torch.zeros(in_features, in_features)")
    rows = x.reshape(-1, features).to(H.dtype)
    total = n_seen + rows.shape[0]
    if total == 0:
        return 0
    if packed:
        H.mul_(n_seen / total).add_(pack_lower(rows.T @ rows), alpha=2.0 / total)
    else:
        H.mul_(n_seen / total).addmm_(rows.T, rows, alpha=2.0 / total)
    return total


def reconstruct_with_mask(W: torch.Tensor, H: torch.Tensor | InverseFactor, mask: torch.Tensor,
                          blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Zero ``W`` where ``mask`` is True and let the other weights absorb the output error.

    The OBS update of SparseGPT with the mask held fixed: masked entries come back exactly
    zero, the others move to reduce ``||W X - W_new X||`` on the calibration inputs.
    Weights of never-active inputs are left as they are unless masked.
    """
    check_args(W, H, blocksize, percdamp)
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of W's shape {list(W.shape)}, got "
                         f"{mask.dtype} {list(mask.shape)}")
    weights, hinv, _ = prepare(W, H, percdamp, zero_dead=False)
    mask = mask.to(weights.device)
    for i1 in range(0, weights.shape[1], blocksize):
        obs_block(weights, hinv, mask, i1, min(i1 + blocksize, weights.shape[1]))
    return weights.to(W.dtype)


def check_args(W: torch.Tensor, H: torch.Tensor | InverseFactor, blocksize: int, percdamp: float) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a Linear weight [out, in], got shape {list(W.shape)}; "
                         "flatten conv weights to [out, -1] and build H from unfolded inputs")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H has shape {list(H.shape)} but W has {W.shape[1]} input columns: "
                         "accumulate H from this layer's inputs with accumulate_hessian")
    if not is_int(blocksize) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} must be a positive int, e.g. 128")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp={percdamp!r} must be a finite number >= 0, e.g. 0.01")
    if isinstance(H, InverseFactor) and H.percdamp != percdamp:
        raise ValueError(f"H was inverted with percdamp={H.percdamp}, not the {percdamp} asked for: "
                         "pass that percdamp, or the Hessian itself")


@dataclass(frozen=True)
class InverseFactor:
    """All a sweep needs of a layer's ``H``, a function of ``H`` and the damping alone, so
    computed once per matrix (``inverse_factor``): the upper Cholesky factor of the damped
    ``H^-1`` and the inputs never active during calibration (zero diagonal)."""

    #: the factor's transpose, contiguous: what travels between ranks (a collective sends a
    #: tensor's storage, and ``cholesky(upper=True)`` returns a transposed view)
    lower: torch.Tensor
    dead: torch.Tensor
    percdamp: float

    @property
    def hinv(self) -> torch.Tensor:
        """The upper factor, laid out as ``torch.linalg.cholesky(..., upper=True)`` gives it."""
        return self.lower.T

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape


def inverse_factor(H: torch.Tensor, percdamp: float) -> InverseFactor:
    """``H``'s ``InverseFactor`` (float32, on ``H``'s device)."""
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # an input never seen: no error couples it to the others
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    factor, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError("the damped Hessian is not positive definite: raise percdamp (e.g. 0.1) "
                         "or use more calibration samples")
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    return InverseFactor(hinv.T.contiguous(), dead, percdamp)


def prepare(W: torch.Tensor, H: torch.Tensor | InverseFactor, percdamp: float,
            zero_dead: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copy of W, the upper Cholesky factor of the damped H^-1, dead-input mask.
    ``H`` may be given as its ``InverseFactor`` already (with this ``percdamp``)."""
    weights = W.detach().float().clone()
    factor = H if isinstance(H, InverseFactor) else inverse_factor(H.to(weights.device), percdamp)
    hinv, dead = factor.hinv.to(weights.device), factor.dead.to(weights.device)
    if zero_dead:
        weights[:, dead] = 0.0
    dead_mask = dead.unsqueeze(0).expand_as(weights) if zero_dead else torch.zeros_like(weights, dtype=torch.bool)
    return weights, hinv, dead_mask


def obs_block(weights: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, i1: int, i2: int,
              choose=None, step: int = STEP) -> None:
    """Prune columns ``i1:i2`` in place, one at a time, then push their error onwards.

    Each column's error goes at once only into the columns of its ``step`` (a run of
    ``step`` columns of the block); the rest of the block takes a whole step's errors in one
    matmul, as the columns after the block do. Same result as column-by-column updates of the
    whole block (up to float rounding), at a fraction of the memory traffic.

    ``choose(block, hinv1, block_mask, i)``, when given, may mark more of ``block_mask``
    before column ``i`` of the block is pruned, from the weights as updated so far (how
    SparseGPT picks N:M groups); it may read only columns of ``i``'s step. Rows never mix,
    so row shards can be swept apart.
    """
    block = weights[:, i1:i2].clone()  # contiguous working copy, written back at the end
    hinv1 = hinv[i1:i2, i1:i2]
    block_mask = mask[:, i1:i2]
    errors = block.new_empty(block.shape[1], block.shape[0])  # column i's error in row i
    zero, diagonal = block.new_zeros(()), torch.diag(hinv1).tolist()
    width = i2 - i1
    for j1 in range(0, width, step):
        j2 = min(j1 + step, width)
        for i in range(j1, j2):
            if choose is not None:
                choose(block, hinv1, block_mask, i)
            err = torch.where(block_mask[:, i], block[:, i], zero, out=errors[i]).div_(diagonal[i])
            block[:, i:j2].addr_(err, hinv1[i, i:j2], alpha=-1.0)
            block[:, i].masked_fill_(block_mask[:, i], 0.0)  # exactly zero, not a rounding residue
        block[:, j2:].addmm_(errors[j1:j2].T, hinv1[j1:j2, j2:], alpha=-1.0)
    weights[:, i1:i2] = block
    weights[:, i2:].addmm_(errors.T, hinv[i1:i2, i2:], alpha=-1.0)
