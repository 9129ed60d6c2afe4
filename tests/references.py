"""Single-process references the distributed tests compare against, and the selection
functions as the tests call them: over every rank of the default process group when one
is set up (under ``multiproc.run_ranks``), else in this process alone."""
from __future__ import annotations

import torch
import torch.distributed as dist

from gradprobe_dist.data.loader import shard_batches
from gradprobe_dist.parallel import select
from gradprobe_dist.parallel.collectives import ProcessGroup
from gradprobe_dist.probe.batches import is_lm_batch


def _collectives() -> ProcessGroup | None:
    return ProcessGroup() if dist.is_available() and dist.is_initialized() else None


def select_smallest(scores, k, gather_limit=select.GATHER_LIMIT):
    return select.select_smallest(scores, k, _collectives(), gather_limit)


def select_smallest_each(scores, ks, gather_limit=select.GATHER_LIMIT):
    return select.select_smallest_each(scores, ks, _collectives(), gather_limit)


def kth_smallest(values: torch.Tensor, k: int, gather_limit: int = 0) -> float:
    """Exact k-th smallest (1-based) of every rank's ``values`` concatenated, as float32:
    the largest of the k smallest. Every rank calls it with the same ``k``."""
    if k == 0:
        raise ValueError("k=0: kth_smallest counts from 1; pass k between 1 and the number of values")
    collectives = _collectives()
    (mask,) = select.select_smallest([values], k, collectives, gather_limit)
    chosen = values.detach().float().reshape(-1)[mask.reshape(-1)]
    worst = torch.tensor([float(chosen.max()) if chosen.numel() else float("-inf")], dtype=torch.float64)
    return float(collectives.all_reduce(worst, "max") if collectives else worst)


def global_reference_batches(shard_dir, *, micro_batch_size: int, num_batches: int,
                             world_size: int) -> list:
    """Global batch t = concatenation, in rank order, of what each of the W ranks reads at
    step t (``shard_batches``), so a W-rank run can be compared with one process fed the
    same samples."""
    per_rank = [shard_batches(shard_dir, micro_batch_size=micro_batch_size, num_batches=num_batches,
                              rank=rank, world_size=world_size)
                for rank in range(world_size)]
    return [_concat_batches(step) for step in zip(*per_rank)]


def _concat_batches(batches):
    if is_lm_batch(batches[0]):
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    return tuple(torch.cat(parts) for parts in zip(*batches))
