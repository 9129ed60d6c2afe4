"""Collectives (and the process-group checks) shared by the multi-rank backends
(DDP, FSDP2, ZeRO-3).

Every function runs on the default process group and must be called by every rank in
the same order. Sharded layouts are one contiguous block per rank of the flattened
weight (``rows`` blocks are such blocks too), so gathering and scattering reduce to one
routine that pads the blocks to equal size, because gloo's ``gather``/``scatter`` need
equal sizes, and trims them again. Tensors travel on the device the process group can
use (CPU for gloo, the current accelerator for nccl); reduced and gathered tensors come
back on the caller's device, scattered and broadcast ones on the device asked for.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from gradprobe_dist.parallel.base import Collectives

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def require_process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group, which the caller must have set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "no default torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group(...) before building a multi-rank backend"
        )
    return dist.get_rank(), dist.get_world_size()


def check_param_names(param_names: list[str], model: nn.Module) -> None:
    """Prunable weights must be parameters of the unwrapped model, named as it names them."""
    known = {name for name, _ in model.named_parameters()}
    missing = [name for name in param_names if name not in known]
    if missing:
        raise ValueError(f"{len(missing)} prunable weights are not parameters of the model, e.g. "
                         f"{missing[:3]}: pass names from model.named_parameters() of the unwrapped model")


def comm_device() -> torch.device:
    """The device collective tensors must live on: CPU when gloo serves CPU tensors,
    else the current accelerator (nccl only moves accelerator memory)."""
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _in_place(tensor: torch.Tensor, collective) -> torch.Tensor:
    """Run the in-place ``collective(t)`` on ``tensor``, through a copy on the communication
    device when it lives elsewhere, and return ``tensor`` holding the result."""
    device = comm_device()
    if tensor.device == device:
        collective(tensor)
        return tensor
    moved = tensor.to(device)
    collective(moved)
    return tensor.copy_(moved)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over ranks in place with ``op`` (``sum``, ``max`` or ``min``)."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"unknown all_reduce op {op!r}: use one of {sorted(_REDUCE_OPS)}")
    return _in_place(tensor, lambda t: dist.all_reduce(t, _REDUCE_OPS[op]))


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``[world_size, *tensor.shape]``: every rank's ``tensor`` (equal shapes), in rank order,
    on the caller's device."""
    moved = tensor.to(comm_device())
    pieces = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, moved)
    return torch.stack(pieces).to(tensor.device)


def reduce(tensor: torch.Tensor, dst: int) -> torch.Tensor:
    """Sum every rank's ``tensor`` into ``dst``'s, in place; the others' are left unspecified."""
    return _in_place(tensor, lambda t: dist.reduce(t, dst=dst))


def broadcast(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """``src``'s ``tensor`` into every rank's (same shape and dtype), in place."""
    return _in_place(tensor, lambda t: dist.broadcast(t, src=src))


def broadcast_object(obj, src: int = 0):
    """``src``'s picklable ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def barrier() -> None:
    dist.barrier()


# -- sharded layouts ------------------------------------------------------------------------
def _all_ranges(start: int, stop: int, problem: str | None) -> torch.Tensor:
    """Every rank's [start, stop) as a (world, 2) int64 tensor, known on every rank.

    A rank whose arguments are wrong says so here (``problem``), so that every rank raises
    together instead of the others hanging in the next collective."""
    mine = torch.tensor([start, stop, problem is not None], dtype=torch.int64, device=comm_device())
    ranges = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(ranges, mine)
    table = torch.stack(ranges).cpu()
    bad = table[:, 2].nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"ranks {bad} passed a local part that does not fit its range"
                         + (f" (this rank: {problem})" if problem else "")
                         + ": pass each rank's own unpadded part and its own [start, stop)")
    return table[:, :2]


def _check_tiling(ranges: torch.Tensor, full_numel: int) -> None:
    """The non-empty ranges must cover [0, full_numel) exactly once, or the gather is ambiguous."""
    lengths = ranges[:, 1] - ranges[:, 0]
    blocks = ranges[lengths > 0]
    blocks = blocks[blocks[:, 0].argsort()]
    contiguous = bool((blocks[1:, 0] == blocks[:-1, 1]).all())
    covers = bool(blocks[0, 0] == 0 and blocks[-1, 1] == full_numel) if len(blocks) else full_numel == 0
    if bool((lengths < 0).any()) or not contiguous or not covers:
        raise ValueError(
            f"rank ranges {ranges.tolist()} do not tile [0, {full_numel}) exactly once: pass each "
            "rank's own [start, stop) of the same weight, with the weight's full size"
        )


def _gather_range(local: torch.Tensor, start: int, stop: int, full_numel: int, dst: int,
                  problem: str | None) -> torch.Tensor | None:
    ranges = _all_ranges(start, stop, problem)
    _check_tiling(ranges, full_numel)
    width = int((ranges[:, 1] - ranges[:, 0]).max())
    padded = torch.zeros(width, dtype=local.dtype, device=comm_device())
    padded[: local.numel()] = local.reshape(-1)
    is_dst = dist.get_rank() == dst
    blocks = [torch.empty_like(padded) for _ in range(len(ranges))] if is_dst else None
    dist.gather(padded, blocks, dst=dst)
    if not is_dst:
        return None
    full = torch.empty(full_numel, dtype=local.dtype, device=local.device)
    for block, (lo, hi) in zip(blocks, ranges.tolist()):  # one copy per rank, not per element
        full[lo:hi] = block[: hi - lo]
    return full


def gather_flat(local: torch.Tensor, start: int, stop: int, full_numel: int, dst: int = 0) -> torch.Tensor | None:
    """Assemble the 1-D full tensor on ``dst`` from every rank's elements [start, stop);
    other ranks get None. ``local`` must hold exactly stop - start elements (no padding)."""
    problem = None
    if local.numel() != stop - start:
        problem = f"{local.numel()} elements for [{start}, {stop})"
    return _gather_range(local, start, stop, full_numel, dst, problem)


def gather_rows(local: torch.Tensor, start: int, stop: int, full_shape, dst: int = 0) -> torch.Tensor | None:
    """Assemble the full tensor of shape ``full_shape`` on ``dst`` from every rank's rows
    [start, stop) of dim 0; other ranks get None."""
    full_shape = torch.Size(full_shape)
    expected = (stop - start, *full_shape[1:])
    problem = None if tuple(local.shape) == expected else f"shape {tuple(local.shape)}, expected {expected}"
    row = math.prod(full_shape[1:])
    flat = _gather_range(local, start * row, stop * row, full_shape.numel(), dst, problem)
    return None if flat is None else flat.reshape(full_shape)


def _source_meta(full: torch.Tensor | None, src: int) -> tuple[torch.dtype, torch.Size]:
    """dtype and shape of ``src``'s full tensor, on every rank."""
    is_src = dist.get_rank() == src
    meta = broadcast_object((full.dtype, full.shape) if is_src and full is not None else None, src)
    if meta is None:
        raise ValueError(f"rank {src} is the scatter source and must pass the full tensor, not None: "
                         "call it with the tensor on that rank and None elsewhere")
    return meta


def broadcast_tensor(full: torch.Tensor | None, src: int = 0,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``src``'s whole tensor on every rank (other ranks pass None), on ``device``
    (default: the communication device); the replicated counterpart of ``scatter_*``."""
    dtype, shape = _source_meta(full, src)
    if dist.get_rank() == src:
        buffer = full.to(comm_device()).contiguous()
    else:
        buffer = torch.empty(shape, dtype=dtype, device=comm_device())
    dist.broadcast(buffer, src=src)
    return buffer.to(device if device is not None else comm_device())


def _scatter_range(flat_full: torch.Tensor | None, start: int, stop: int, full_numel: int,
                   dtype: torch.dtype, src: int, device) -> torch.Tensor:
    problem = None if 0 <= start <= stop <= full_numel else f"[{start}, {stop}) outside [0, {full_numel})"
    ranges = _all_ranges(start, stop, problem).tolist()
    width = max(hi - lo for lo, hi in ranges)
    received = torch.empty(width, dtype=dtype, device=comm_device())
    blocks = None
    if dist.get_rank() == src:
        flat_full = flat_full.to(comm_device())
        blocks = [torch.zeros_like(received) for _ in ranges]
        for block, (lo, hi) in zip(blocks, ranges):  # one copy per rank, not per element
            block[: hi - lo] = flat_full[lo:hi]
    dist.scatter(received, blocks, src=src)
    return received[: stop - start].to(device if device is not None else comm_device())


def scatter_flat(full: torch.Tensor | None, start: int, stop: int, src: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """This rank's 1-D slice [start, stop) of ``full.flatten()``, where ``full`` lives on
    ``src`` (other ranks pass None); returned on ``device`` (default: the communication device)."""
    dtype, shape = _source_meta(full, src)
    flat = full.reshape(-1) if full is not None else None
    return _scatter_range(flat, start, stop, shape.numel(), dtype, src, device)


def scatter_rows(full: torch.Tensor | None, start: int, stop: int, src: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """This rank's rows [start, stop) of dim 0 of ``full``, which lives on ``src`` (other
    ranks pass None); returned on ``device`` (default: the communication device)."""
    dtype, shape = _source_meta(full, src)
    row = math.prod(shape[1:])
    flat = full.reshape(-1) if full is not None else None
    part = _scatter_range(flat, start * row, stop * row, shape.numel(), dtype, src, device)
    return part.reshape(stop - start, *shape[1:])


class ProcessGroup(Collectives):
    """A backend's collectives over the default process group (set up by the caller)."""

    def __init__(self):
        self.rank, self.world_size = require_process_group()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather(tensor)

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        return reduce(tensor, dst)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return broadcast(tensor, src)

    def broadcast_object(self, obj):
        return broadcast_object(obj, src=0)

    def barrier(self) -> None:
        barrier()
