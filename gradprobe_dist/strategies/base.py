"""The strategy interface: which weights the probe tentatively scales down.

A user's strategy only implements ``select_weights_to_prune(model, sparsity)`` (the
original GradProbe API) and gets, in the probe, the model itself when every rank holds
whole weights (one process, DDP), or under FSDP2/ZeRO-3 a view whose
``named_parameters()`` yields only this rank's local part of each prunable weight.

Built-in strategies implement ``select(context, sparsity)`` instead, which sees the local
parts, where they sit in the full weight, calibration activation norms and exact
cross-rank selection, so they give the same masks in every parallel mode.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend, LocalSlice


@dataclass
class SelectionContext:
    """What a strategy sees of the model inside the probe (all tensors are local parts)."""

    weights: dict[str, torch.Tensor]
    slices: dict[str, LocalSlice]
    backend: Backend
    #: per prunable weight: sum over every calibration token (all ranks) of x_j^2 for each
    #: input feature j of the owning layer; present when the strategy asked for activations.
    input_sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the unwrapped model, given to user strategies when weights are whole on every rank.
    model: nn.Module | None = None
    #: per-layer selection sparsity when an allocation spreads the target unevenly
    layer_sparsity: dict[str, float] | None = None
    #: weights stored as [in, out] (GPT-2's Conv1D): an output feature is a column
    transposed: frozenset[str] = frozenset()

    def sparsity_of(self, name: str, sparsity: float) -> float:
        """The selection sparsity of layer ``name`` (``sparsity`` unless allocated per layer)."""
        return self.layer_sparsity[name] if self.layer_sparsity else sparsity

    @classmethod
    def for_model(cls, model: nn.Module, names: list[str] | None = None) -> "SelectionContext":
        """A single-process context (used when a strategy is called directly on a model)."""
        from gradprobe_dist.parallel.local import LocalBackend
        from gradprobe_dist.probe.params import find_prunable

        owners = find_prunable(model)
        names = names or list(owners)
        params = dict(model.named_parameters())
        backend = LocalBackend(device=next(model.parameters()).device)
        backend.prepare(model, names)
        backend.release()  # the context only reads weights; nothing may stay frozen
        return cls(weights={n: params[n].data for n in names},
                   slices={n: LocalSlice(params[n].shape, "full") for n in names},
                   backend=backend, model=model, transposed=transposed_names(owners))

    def select_smallest(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Exactly ``k`` smallest scores over all layers and ranks (ties: model order)."""
        masks = self.backend.select_smallest(list(scores.values()), k)
        return dict(zip(scores, masks))

    def select_smallest_each(self, scores: dict[str, torch.Tensor],
                             ks: dict[str, int]) -> dict[str, torch.Tensor]:
        """Per layer, exactly ``ks[name]`` smallest scores over that layer's shards."""
        masks = self.backend.select_smallest_each(list(scores.values()), [ks[n] for n in scores])
        return dict(zip(scores, masks))

    def inputs_per_output(self, name: str) -> int:
        """How many input weights feed one output feature of weight ``name``."""
        where = self.slices[name]
        if name in self.transposed:
            return int(where.full_shape[0])
        return where.full_numel // where.full_shape[0]

    def select_in_rows(self, name: str, local_scores: torch.Tensor, choose) -> torch.Tensor:
        """``choose_per_output`` for weight ``name`` of this context."""
        return choose_per_output(self.backend, name, self.slices[name], name in self.transposed,
                                 local_scores, choose)

    def as_module(self) -> nn.Module | "LocalWeightsView":
        """What a user strategy's ``select_weights_to_prune`` receives as ``model``."""
        if self.model is not None and all(s.layout == "full" for s in self.slices.values()):
            return self.model
        return LocalWeightsView(self.weights)


class LocalWeightsView:
    """Module-like view of this rank's local parts of the prunable weights."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self._weights = weights

    def named_parameters(self, *args, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._weights.items()

    def parameters(self, *args, **kwargs) -> Iterator[torch.Tensor]:
        yield from self._weights.values()


class PruningStrategy(ABC):
    """Base class of every strategy; subclass and implement ``select_weights_to_prune``."""

    #: set True when ``select`` needs ``context.input_sq_norms`` (collected by forward
    #: hooks during the baseline pass, at no extra pass).
    needs_activations: bool = False

    @abstractmethod
    def select_weights_to_prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        """Boolean masks (True = tentatively prune) keyed by parameter name."""

    @abstractmethod
    def get_name(self) -> str:
        """A short name for logs and result tables."""

    def select(self, context: SelectionContext, sparsity: float) -> dict[str, torch.Tensor]:
        """The probe's entry point; by default the original API on ``context.as_module()``."""
        return self.select_weights_to_prune(context.as_module(), sparsity)


def choose_per_output(backend: Backend, name: str, where: LocalSlice, transposed: bool,
                      local_scores: torch.Tensor, choose) -> torch.Tensor:
    """Apply ``choose(scores[outputs, inputs]) -> mask`` to whole output features of weight
    ``name`` and return this rank's local mask. They are local when the rank holds the whole
    weight, or whole rows of an [out, in] weight (FSDP2 ``Shard(0)``); ZeRO-3's flat
    partitions and FSDP2 rows of an [in, out] weight (``transposed``) cut them, so that one
    layer is gathered on the main rank, decided there and scattered back (one layer in memory)."""

    def by_output(scores: torch.Tensor) -> torch.Tensor:
        if transposed:
            return choose(scores.T).T.contiguous()
        return choose(scores.reshape(scores.shape[0], -1)).reshape(scores.shape)

    if where.layout == "full" or (where.layout == "rows" and not transposed):
        return by_output(local_scores)
    full = backend.gather_full(name, local_scores)
    full_mask = by_output(full.reshape(where.full_shape)) if full is not None else None
    return backend.scatter_full(name, full_mask)


class ScoredStrategy(PruningStrategy):
    """A strategy defined by a score and a rule picking the lowest scores (the built-ins).

    Target mode walks this order with the probe's veto (vetoed candidates moved last, the
    same rule applied); a strategy that only returns masks gets the ratio-only fallback."""

    @abstractmethod
    def scores(self, context: SelectionContext) -> dict[str, torch.Tensor]:
        """Local scores per weight, lower = pruned first."""

    @abstractmethod
    def select_lowest(self, context: SelectionContext, scores: dict[str, torch.Tensor],
                      sparsity: float) -> dict[str, torch.Tensor]:
        """The strategy's own rule (exactly its count of the lowest ``scores`` per row, per
        layer, over all layers or per N:M group) applied to any ``scores``."""

    def select(self, context: SelectionContext, sparsity: float) -> dict[str, torch.Tensor]:
        return self.select_lowest(context, self.scores(context), sparsity)


def count_to_select(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` fraction selects (rounded down; the
    epsilon keeps e.g. 100 * 0.29 = 28.999999999999996 from losing a weight)."""
    return math.floor(numel * sparsity + 1e-6)


def transposed_names(owners: dict[str, nn.Module]) -> frozenset[str]:
    """Names of weights whose owner stores them as [in, out]."""
    from gradprobe_dist.probe.params import stores_transposed

    return frozenset(n for n, m in owners.items() if stores_transposed(m))


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): N of every M consecutive input weights (semi-structured sparsity)."""
    if pattern is None:
        return None
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not N:M, e.g. '2:4' or '4:8'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} needs 0 < N < M, e.g. '2:4'")
    return n, m


def check_nm_shape(context: SelectionContext, name: str, m: int) -> None:
    cols = context.inputs_per_output(name)
    if cols % m:
        raise ValueError(f"{name} has {cols} input weights per row, not a multiple of M={m}: "
                         "exclude it (model.exclude) or choose another pattern")


def local_part(full: torch.Tensor, where: LocalSlice) -> torch.Tensor:
    """Cut this rank's part, in local shape, out of a full-shape tensor."""
    if where.layout == "full":
        return full
    if where.layout == "rows":
        return full[where.start:where.stop]
    return full.reshape(-1)[where.start:where.stop]
