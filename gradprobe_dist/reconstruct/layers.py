"""Run SparseGPT (adaptive mask) or the fixed-mask OBS update on every layer, under any backend.

The math wants a weight as ``[out, in]`` rows, which never mix given ``H``. Where a rank
holds whole rows, it works on them in place: one process and DDP hold every row
(replicated: every rank computes the same), FSDP2's ``Shard(0)`` holds a block of rows;
SparseGPT's per-tile quota is then an exact selection over all ranks
(``Backend.select_smallest_each``), one per column block for a chunk of layers together.
Where the local part cuts rows (ZeRO-3's flat partitions; GPT-2's ``Conv1D``, stored
``[in, out]``, under row sharding), the layer is gathered on the main rank, computed there
and scattered back, one layer at a time, so memory stays bounded by one layer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gradprobe_dist.parallel.base import Backend, LocalSlice
from gradprobe_dist.reconstruct.hessians import Hessians, as_hessians
from gradprobe_dist.reconstruct.sparsegpt import sparsegpt_layers

#: layers swept in lockstep (their float32 copies live at once); one selection per block covers them
LAYERS_AT_ONCE = 8


def works_in_place(where: LocalSlice, transposed: bool) -> bool:
    """True when the local part holds whole ``[out, in]`` rows of the weight."""
    return where.layout == "full" or (where.layout == "rows" and not transposed)


def as_rows(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` view of a weight-shaped tensor (its own inverse)."""
    return tensor.reshape(tensor.shape[0], -1) if not transposed else tensor.T


def on_main(backend: Backend, name: str, tensors: list[torch.Tensor], transposed: bool,
            fn: Callable[..., list[torch.Tensor]], outputs: int) -> list[torch.Tensor]:
    """Gather the local parts ``tensors`` of weight ``name`` on the main rank, call
    ``fn(*rows)`` there on their ``[out, in]`` views, and return this rank's parts of the
    ``outputs`` ``[out, in]`` tensors it returns. A collective, one layer at a time; if ``fn``
    raises, every rank raises (none waits in the scatter)."""
    full = [backend.gather_full(name, t) for t in tensors]
    results, error = None, None
    if backend.is_main:
        shape = backend.local_slice(name).full_shape
        try:
            results = [as_rows(o, transposed).reshape(shape)
                       for o in fn(*(as_rows(f.reshape(shape), transposed) for f in full))]
        except Exception as err:  # re-raised on every rank below
            error = err
    message = backend.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"the main rank failed on layer {name}: {message}")
    return [backend.scatter_full(name, results[i] if results is not None else None) for i in range(outputs)]


def sparsegpt_masks(backend: Backend, hessians: Hessians | Mapping[str, torch.Tensor], sparsity: float, *,
                    nm: tuple[int, int] | None = None, vetoes: dict[str, torch.Tensor] | None = None,
                    transposed: frozenset[str] = frozenset(), blocksize: int = 128,
                    percdamp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune every weight in ``hessians`` (its current local values, dense) with SparseGPT
    and write the updated weights back; returns the local masks (True = pruned).

    ``vetoes``: per weight, a local bool mask of the weights to keep unless the quota needs
    them (see ``sparsegpt.py``); each is let go once its layer is pruned, so a caller that
    keeps no other reference frees them as the sweep goes. A collective: every rank passes
    the same names.
    """
    vetoes = dict(vetoes or {})
    hessians = as_hessians(hessians)
    hessians.invert(percdamp)  # each matrix factored once, on its owner
    names = list(hessians)  # sorted: the same order on every rank
    masks: dict[str, torch.Tensor] = {}
    in_place = [n for n in names if works_in_place(backend.local_slice(n), n in transposed)]
    for start in range(0, len(in_place), LAYERS_AT_ONCE):
        chunk = in_place[start:start + LAYERS_AT_ONCE]
        weights = [backend.local_weight(n) for n in chunk]
        results = sparsegpt_layers(
            [as_rows(w, n in transposed) for w, n in zip(weights, chunk)],
            hessians.fetch(chunk), sparsity, nm=nm,
            vetoes=[as_rows(vetoes[n], n in transposed) if n in vetoes else None for n in chunk],
            blocksize=blocksize, percdamp=percdamp,
            select_each=backend.select_smallest_each, sum_counts=backend.sum_over_shards)
        with torch.no_grad():
            for n, w, (new, mask) in zip(chunk, weights, results):
                w.copy_(as_rows(new, n in transposed).reshape(w.shape))
                masks[n] = as_rows(mask, n in transposed).reshape(w.shape)
                vetoes.pop(n, None)
    for n in (n for n in names if n not in masks):
        weight = backend.local_weight(n)
        local = [weight] + ([vetoes.pop(n)] if n in vetoes else [])
        (H,) = hessians.fetch([n])

        def prune(w, veto=None, H=H):
            return list(sparsegpt_layers([w], [H], sparsity, nm=nm, vetoes=[veto],
                                         blocksize=blocksize, percdamp=percdamp)[0])

        new, mask = on_main(backend, n, local, n in transposed, prune, outputs=2)
        with torch.no_grad():
            weight.copy_(new.reshape(weight.shape))
        masks[n] = mask.reshape(weight.shape).to(weight.device)
    backend.commit_weights(names)
    return masks
