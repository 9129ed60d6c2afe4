"""Reconstruction after the probe: let the surviving weights compensate for the pruned ones.

Once a layer's mask is decided, SparseGPT's Optimal-Brain-Surgeon update with the mask held
fixed (``reconstruct.reconstruct_with_mask``) moves the kept weights to reduce the layer's
output error on the calibration inputs. It needs ``H = 2 X X^T`` of each layer's inputs,
collected by forward hooks during the baseline pass (no extra pass), or the forward-only pass
of a strategy selecting alone, and averaged over ranks onto owner ranks (``hessians.py``).
Where each layer is computed (in place on whole rows, or gathered one layer at a time on the
main rank) is ``layers.py``'s business.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.reconstruct.layers import as_rows, on_main, works_in_place
from gradprobe_dist.reconstruct.hessians import Hessians, as_hessians
from gradprobe_dist.reconstruct.obs import reconstruct_with_mask


def compensate(backend: Backend, record: ProbeRecord, masks: dict[str, torch.Tensor],
               blocksize: int = 128, percdamp: float = 0.01,
               transposed: frozenset[str] = frozenset()) -> list[str]:
    """Prune ``masks`` from the dense weights (the probe's saved originals put back) with the
    OBS update of every layer that has a Hessian; returns the names updated. ``transposed``:
    weights stored ``[in, out]`` (GPT-2's ``Conv1D``)."""
    def dense(name: str) -> torch.Tensor:
        weight = backend.local_weight(name).clone()
        layer = record.layers[name]
        weight[layer.tentative] = layer.originals.to(weight.device)
        return weight

    return reconstruct_from(backend, record.hessians or {}, masks, dense, blocksize, percdamp, transposed)


def reconstruct_from(backend: Backend, hessians: Hessians | Mapping[str, torch.Tensor], masks: dict[str, torch.Tensor],
                     dense_of, blocksize: int = 128, percdamp: float = 0.01,
                     transposed: frozenset[str] = frozenset()) -> list[str]:
    """``compensate`` from ``dense_of(name)``, each layer's dense local weight (a copy), for
    every layer in ``hessians``: the pruned weights come back zero, the kept ones updated."""
    hessians = as_hessians(hessians)
    hessians.invert(percdamp)  # each matrix factored once, on its owner
    updated = []
    for name in hessians:  # sorted: the same order on every rank
        weight = backend.local_weight(name)
        flip = name in transposed
        (H,) = hessians.fetch([name])

        def update(w, mask, H=H):
            return [reconstruct_with_mask(w, H, mask, blocksize, percdamp)]

        with torch.no_grad():
            dense = dense_of(name)
            if works_in_place(backend.local_slice(name), flip):
                (new,) = update(as_rows(dense, flip), as_rows(masks[name], flip))
                new = as_rows(new, flip)
            else:
                (new,) = on_main(backend, name, [dense, masks[name]], flip, update, outputs=1)
            weight.copy_(new.reshape(weight.shape))
        updated.append(name)
    backend.commit_weights(updated)
    return updated
