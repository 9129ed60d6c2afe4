"""The small interface the probe asks of a parallelism (local, DDP, FSDP2, ZeRO-3).

The probe never imports torch.distributed, FSDP or DeepSpeed: it asks a backend for
this rank's part of a gradient or a weight, and for the few collectives it needs.
Every "local" tensor below is this rank's part of one prunable weight:

* ``layout="full"``: the whole weight (single process, DDP: replicated on every rank);
* ``layout="rows"``: rows ``[start, stop)`` of dim 0 (FSDP2 ``Shard(0)``);
* ``layout="flat"``: elements ``[start, stop)`` of ``weight.flatten()`` (ZeRO-3 partitions).

Statistics, tentative masks, saved originals and decisions all live in that local shape.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from gradprobe_dist.runtime.log import is_main_process


@dataclass(frozen=True)
class LocalSlice:
    """Where this rank's local tensor sits inside the full weight."""

    full_shape: torch.Size
    layout: Literal["full", "rows", "flat"]
    start: int = 0
    stop: int = 0

    @property
    def full_numel(self) -> int:
        return int(torch.Size(self.full_shape).numel())

    def flat_range(self) -> tuple[int, int]:
        """[start, stop) of the local part in ``weight.flatten()`` order."""
        if self.layout == "full":
            return 0, self.full_numel
        if self.layout == "flat":
            return self.start, self.stop
        row = self.full_numel // self.full_shape[0] if self.full_shape[0] else 0
        return self.start * row, self.stop * row


def freeze_all_but(params: dict[str, nn.Parameter], names) -> dict[str, bool]:
    """Only ``names`` keep ``requires_grad`` (backward skips every other gradient); returns
    the previous flags for ``restore_requires_grad``."""
    saved = {n: p.requires_grad for n, p in params.items()}
    wanted = set(names)
    for n, p in params.items():
        p.requires_grad_(n in wanted)
    return saved


def restore_requires_grad(params: dict[str, nn.Parameter], saved: dict[str, bool] | None) -> None:
    for n, flag in (saved or {}).items():
        params[n].requires_grad_(flag)


def drop_grads(params: dict[str, nn.Parameter]) -> None:
    for p in params.values():
        p.grad = None


class Collectives:
    """The collectives a backend needs, for this process alone (each one is the identity).

    Multi-rank backends hold ``collectives.ProcessGroup``, the same calls over the default
    process group; every rank must make them in the same order.
    """

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over ranks in place (``sum``, ``max`` or ``min``); returns it."""
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's ``tensor`` (same shape), in rank order."""
        return tensor.unsqueeze(0)

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum every rank's ``tensor`` into ``dst``'s, in place (the others' are left
        unspecified); returns it."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``src``'s ``tensor`` into every rank's (same shape and dtype), in place; returns it."""
        return tensor

    def broadcast_object(self, obj):
        """The main rank's picklable ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        pass


class Backend(ABC):
    """Gradients, weights and collectives for one parallel mode."""

    name: str = "base"
    #: True when every rank holds the whole weight (counts must not be summed over ranks).
    replicated: bool = True

    def __init__(self, device: torch.device | str | None = None, collectives: Collectives | None = None):
        self.collectives = collectives if collectives is not None else Collectives()
        self.rank = self.collectives.rank
        self.world_size = self.collectives.world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return is_main_process(self.rank)

    # -- model ---------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        """Place/wrap ``model`` for this mode; return the module to call forward on.

        ``param_names`` are the prunable weights (names in the unwrapped model); only
        those need gradients. Called once per probe; ``release`` undoes temporary state.
        """

    def release(self) -> None:
        """Undo temporary wrapping done by ``prepare`` where the mode allows it."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the local micro-batch loss; afterwards local grads are rank-averaged."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop the gradients of the last backward."""

    @abstractmethod
    def local_grad(self, name: str) -> torch.Tensor | None:
        """This rank's part of the rank-averaged gradient of weight ``name`` (None: no grad)."""

    @abstractmethod
    def local_weight(self, name: str) -> torch.Tensor:
        """This rank's part of weight ``name``; in-place edits under ``no_grad`` are seen by
        the next forward once ``commit_weights`` has been called."""

    @abstractmethod
    def local_slice(self, name: str) -> LocalSlice:
        """How ``local_weight(name)`` maps into the full weight."""

    def local_part(self, param: nn.Parameter) -> torch.Tensor:
        """This rank's data of any parameter of the prepared model, prunable or not (used to
        name a non-finite weight); whole tensors unless the mode shards them."""
        return param.detach()

    def gather_parameter(self, param: nn.Parameter) -> torch.Tensor | None:
        """The whole of any parameter of the model, prepared or loaded sharded, on the main
        rank (None on the others); every rank calls it, one parameter at a time."""
        return param.detach() if self.is_main else None

    def commit_weights(self, names: list[str]) -> None:
        """Make in-place edits of local weights durable and visible (ZeRO-3 needs this)."""

    def close(self) -> None:
        """Tear down what ``prepare`` built for good (an engine, its hooks, gathered copies);
        called once, by every rank, before the process group is destroyed."""

    # -- collectives (identities for one process) ----------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over ranks (``sum``, ``max`` or ``min``); returns ``tensor``."""
        return self.collectives.all_reduce(tensor, op)

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum every rank's ``tensor`` (e.g. statistics of each rank's own micro-batches)."""
        return self.collectives.all_reduce(tensor, "sum")

    def sum_to_rank(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum every rank's ``tensor`` into rank ``dst``'s, in place; on the other ranks it
        is left unspecified (for a result only its owner keeps)."""
        return self.collectives.reduce(tensor, dst)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` into every rank's, in place; returns it."""
        return self.collectives.broadcast(tensor, src)

    def sum_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a count over the shards of the weights: over ranks when each holds a part,
        the identity when every rank holds the whole weight (``replicated``)."""
        return tensor if self.replicated else self.sum_over_ranks(tensor)

    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor | None:
        """Assemble the full-shape tensor of weight ``name`` from every rank's ``local``
        part (same layout as ``local_weight``) on the main rank; other ranks get None.
        Called one layer at a time, so memory stays bounded by the largest layer."""
        return local.reshape(self.local_slice(name).full_shape) if self.is_main else None

    def scatter_full(self, name: str, full: torch.Tensor | None) -> torch.Tensor:
        """Inverse of ``gather_full``: the main rank's full tensor, cut to this rank's part."""
        assert full is not None
        return full

    def select_smallest(self, scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        """Exactly ``k`` smallest over all tensors and shards (see ``parallel.select``)."""
        from gradprobe_dist.parallel import select  # it checks counts with probe.validation

        return select.select_smallest(scores, k, self._shard_collectives())

    def select_smallest_each(self, scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
        """Per tensor i, exactly ``ks[i]`` smallest over that tensor's shards."""
        from gradprobe_dist.parallel import select

        return select.select_smallest_each(scores, ks, self._shard_collectives())

    def _shard_collectives(self) -> Collectives | None:
        """Who holds parts of a weight: every rank, or (replicated) this rank alone."""
        return None if self.replicated else self.collectives

    def broadcast_object(self, obj):
        """The main rank's ``obj`` on every rank."""
        return self.collectives.broadcast_object(obj)

    def barrier(self) -> None:
        self.collectives.barrier()
