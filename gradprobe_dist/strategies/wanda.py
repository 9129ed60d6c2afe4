"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, prune the lowest per output row.

||X_j||_2 is the norm of input feature j over every calibration token; the probe collects
it with forward hooks during its baseline pass, so Wanda costs no extra pass. For a conv
layer a "row" is an output channel (weight flattened to [out, in*k*k]) and feature j is
the input channel of the column.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import PruningStrategy, SelectionContext, count_to_select, local_part


def column_norms(input_sq_norm: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    """||X_j|| for every column of the weight flattened to [out, -1]."""
    kernel = int(torch.Size(full_shape[2:]).numel()) if len(full_shape) > 2 else 1
    if input_sq_norm.numel() * kernel != torch.Size(full_shape[1:]).numel():
        raise ValueError(f"Wanda: activation norms of {input_sq_norm.numel()} features do not "
                         f"match a weight of shape {list(full_shape)} (grouped convs are not supported)")
    return input_sq_norm.float().sqrt().repeat_interleave(kernel)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| for a full weight, shape [out, in*k*k]."""
    rows = weight.detach().reshape(weight.shape[0], -1).abs().float()
    return rows * column_norms(input_sq_norm, weight.shape).to(rows.device)


def lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores in each row (ties: lower column first)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


class WandaPruning(PruningStrategy):
    """Per output row, the ``sparsity`` fraction of weights with the lowest Wanda score."""

    needs_activations = True

    def get_name(self) -> str:
        return "wanda"

    def select_weights_to_prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        raise TypeError("WandaPruning needs calibration activations: use it through "
                        "GradProbe(model, WandaPruning()).prune(...), or call "
                        "select(context, sparsity) with context.input_sq_norms filled")

    def select(self, context: SelectionContext, sparsity: float) -> dict[str, torch.Tensor]:
        masks = {}
        for name, weight in context.weights.items():
            where = context.slices[name]
            norms = context.input_sq_norms[name]
            k = count_to_select(int(torch.Size(where.full_shape[1:]).numel()), sparsity)
            if where.layout == "flat":  # rows are cut across ranks: decide one whole layer on the main rank
                masks[name] = self._select_flat(context, name, weight, norms, k)
                continue
            local_shape = torch.Size([weight.shape[0], *where.full_shape[1:]])
            scores = wanda_scores(weight.reshape(local_shape), norms)
            masks[name] = lowest_per_row(scores, k).reshape(weight.shape)
        return masks

    @staticmethod
    def _select_flat(context, name, weight, norms, k):
        where = context.slices[name]
        start, stop = where.flat_range()
        row_len = where.full_numel // where.full_shape[0]
        cols = torch.arange(start, stop, device=weight.device) % row_len
        local_scores = weight.detach().abs().float() * column_norms(norms, where.full_shape).to(weight.device)[cols]
        full_scores = context.backend.gather_full(name, local_scores)
        full_mask = None
        if full_scores is not None:
            full_mask = lowest_per_row(full_scores.reshape(where.full_shape[0], -1), k).reshape(where.full_shape)
        return context.backend.scatter_full(name, full_mask)
