"""Symmetric matrices (a Hessian) and triangular ones (its inverse Cholesky factor) kept
as their lower triangle, row by row: n(n+1)/2 numbers instead of n^2.

Every rank folds its calibration inputs into every Hessian of a stage before any can be
averaged, so packing halves what the baseline pass holds for them (about 400 -> 200 MiB
per rank for SmolLM2-135M), and what the owners keep and send afterwards. Cholesky
reads only the lower triangle, so a matrix rebuilt from it factors exactly as before.
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=8)
def _lower(n: int, device: torch.device) -> torch.Tensor:
    """Where the lower triangle of an n x n matrix lies (a bool mask: 1 byte per entry,
    an eighth of an index tensor's size)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_()


def packed_size(n: int) -> int:
    return n * (n + 1) // 2


def side(packed: torch.Tensor) -> int:
    """n of the n x n matrix whose lower triangle ``packed`` holds."""
    n = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    if packed.dim() != 1 or packed_size(n) != packed.numel():
        raise ValueError(f"a packed triangle is 1-D with n(n+1)/2 entries, got shape {list(packed.shape)}")
    return n


def pack_lower(matrix: torch.Tensor) -> torch.Tensor:
    """The lower triangle of a square ``matrix`` (diagonal included), row by row."""
    return matrix.masked_select(_lower(matrix.shape[0], matrix.device))


def unpack_lower(packed: torch.Tensor) -> torch.Tensor:
    """The lower-triangular matrix ``packed`` holds (zeros above the diagonal)."""
    n = side(packed)
    return packed.new_zeros(n, n).masked_scatter_(_lower(n, packed.device), packed)


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle ``packed`` holds."""
    matrix = unpack_lower(packed)
    matrix.T.masked_scatter_(_lower(matrix.shape[0], packed.device), packed)  # mirror into the upper
    return matrix
