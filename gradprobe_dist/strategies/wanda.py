"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, prune the lowest per output feature.

||X_j||_2 is the norm of input feature j over every calibration token; the probe collects
it with forward hooks during its baseline pass, so Wanda costs no extra pass. For a conv
layer an output feature is an output channel (weight flattened to [out, in*k*k]) and
feature j is the input channel of the column. GPT-2's Conv1D stores its weight as
[in, out]: there an output feature is a column of the stored weight and the input norms
run along dim 0.

Every output feature needs all of its input weights to pick its lowest k:
``SelectionContext.select_in_rows`` finds them locally, or gathers one layer on the main
rank where a layout cuts them (ZeRO-3's flat partitions, FSDP2 rows of an [in, out] weight).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import LocalSlice
from gradprobe_dist.parallel.select import with_first_ties
from gradprobe_dist.probe.decision import lowest_in_groups
from gradprobe_dist.strategies.base import ScoredStrategy, SelectionContext, check_nm_shape, count_to_select, parse_pattern


def input_norms(input_sq_norm: torch.Tensor, full_shape: torch.Size, transposed: bool) -> torch.Tensor:
    """||X_j|| per input position of one output feature: per row of an [in, out] weight
    (``transposed``), else per column of the weight flattened to [out, -1]."""
    full_shape = torch.Size(full_shape)
    if transposed:
        if input_sq_norm.numel() != full_shape[0]:
            raise ValueError(f"Wanda: activation norms of {input_sq_norm.numel()} features do not "
                             f"match the {full_shape[0]} input rows of an [in, out] weight of shape "
                             f"{list(full_shape)}")
        return input_sq_norm.float().sqrt()
    kernel = int(full_shape[2:].numel()) if len(full_shape) > 2 else 1
    if input_sq_norm.numel() * kernel != full_shape[1:].numel():
        raise ValueError(f"Wanda: activation norms of {input_sq_norm.numel()} features do not "
                         f"match a weight of shape {list(full_shape)} (grouped convs are not supported)")
    return input_sq_norm.float().sqrt().repeat_interleave(kernel)


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor, where: LocalSlice,
                 transposed: bool = False) -> torch.Tensor:
    """|W| * ||X_j|| for this rank's part ``weight`` of the full weight ``where`` describes,
    in the local shape."""
    norms = input_norms(input_sq_norm, where.full_shape, transposed).to(weight.device)
    magnitude = weight.detach().abs().float()
    row_len = where.full_numel // where.full_shape[0] if where.full_shape[0] else 0
    start, stop = where.flat_range()
    if where.layout == "flat":
        position = torch.arange(start, stop, device=weight.device)
        return magnitude * norms[position // row_len if transposed else position % row_len]
    rows = magnitude.reshape(magnitude.shape[0], row_len)  # explicit: a rank may hold no rows
    if transposed:
        first = start // row_len if row_len else 0
        return (rows * norms[first:first + rows.shape[0], None]).reshape(weight.shape)
    return (rows * norms).reshape(weight.shape)


def lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest scores in each row (ties: lower column first), what a stable
    sort gives, from each row's k-th value instead of a full sort (about 3x faster on CPU:
    this runs over every prunable weight of an LLM)."""
    if k <= 0 or scores.shape[1] == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < kth  # the first (k - count below) tied columns of each row complete it
    return with_first_ties(below, scores == kth, k - below.count_nonzero(dim=1).unsqueeze(1), dim=1)


class WandaPruning(ScoredStrategy):
    """Per output feature, the ``sparsity`` fraction of weights with the lowest Wanda score;
    with ``pattern="N:M"``, the lowest floor(sparsity * M) of every M consecutive inputs."""

    needs_activations = True

    def __init__(self, pattern: str | None = None):
        self.nm = parse_pattern(pattern)

    def get_name(self) -> str:
        return f"wanda_{self.nm[0]}:{self.nm[1]}" if self.nm else "wanda"

    def select_weights_to_prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        raise TypeError("WandaPruning needs calibration activations: use it through "
                        "GradProbe(model, WandaPruning()).prune(...), or call "
                        "select(context, sparsity) with context.input_sq_norms filled")

    def scores(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        return {name: wanda_scores(weight, context.input_sq_norms[name], context.slices[name],
                                   name in context.transposed)
                for name, weight in context.weights.items()}

    def select_lowest(self, context: SelectionContext, scores: dict[str, torch.Tensor],
                      sparsity: float) -> dict[str, torch.Tensor]:
        masks = {}
        for name in context.weights:
            if self.nm:
                m = self.nm[1]
                check_nm_shape(context, name, m)
                k = count_to_select(m, sparsity)
                choose = lambda rows, k=k, m=m: lowest_in_groups(rows, k, m)  # noqa: E731
            else:
                k = count_to_select(context.inputs_per_output(name), context.sparsity_of(name, sparsity))
                choose = lambda rows, k=k: lowest_per_row(rows, k)  # noqa: E731
            masks[name] = context.select_in_rows(name, scores[name], choose)
        return masks
