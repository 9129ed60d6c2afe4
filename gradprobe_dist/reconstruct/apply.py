"""Reconstruction after the probe: let the surviving weights compensate for the pruned ones.

Once a layer's mask is decided, SparseGPT's Optimal-Brain-Surgeon update with the mask held
fixed (``reconstruct.reconstruct_with_mask``) moves the kept weights to reduce the layer's
output error on the calibration inputs. It needs ``H = 2 X X^T`` of each layer's inputs,
collected by forward hooks during the baseline pass (no extra pass), or the forward-only pass
of a strategy selecting alone, and averaged over ranks.
Where each layer is computed (in place on whole rows, or gathered one layer at a time on the
main rank) is ``layers.py``'s business.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.record import ProbeRecord
from gradprobe_dist.probe.params import transposed_linear_types
from gradprobe_dist.reconstruct.layers import as_rows, on_main, works_in_place
from gradprobe_dist.reconstruct.obs import accumulate_hessian, reconstruct_with_mask


@contextmanager
def collect_input_hessians(owners: dict[str, nn.Module]):
    """Yield name -> [H, n_seen] running means of 2 x x^T for every Linear layer in ``owners``
    (``nn.Linear`` and GPT-2's transposed ``Conv1D``, whose input is ``[..., in]`` too).

    Layers fed the very same input tensor (a LLaMA block's q/k/v, its gate/up) share one
    entry, folded once: the same matrices, at 4 instead of 7 per block."""
    hessians: dict[str, list] = {}
    handles = []
    last: dict = {"input": None, "entry": None}  # the input folded most recently, and where

    def make_hook(name: str):
        def hook(module, inputs):
            if inputs[0] is last["input"] and hessians.setdefault(name, last["entry"]) is last["entry"]:
                return  # another layer already folded this very input into the shared entry
            x = inputs[0].detach().float()
            if name not in hessians:
                hessians[name] = [torch.zeros(x.shape[-1], x.shape[-1], device=x.device), 0]
            entry = hessians[name]
            entry[1] = accumulate_hessian(entry[0], x, entry[1])
            last["input"], last["entry"] = inputs[0], entry
        return hook

    try:
        for name, module in owners.items():
            if isinstance(module, (nn.Linear, *transposed_linear_types())):
                handles.append(module.register_forward_pre_hook(make_hook(name)))
        yield hessians
    finally:
        for h in handles:
            h.remove()
        last.clear()


def average_over_ranks(hessians: dict[str, list], backend: Backend) -> dict[str, torch.Tensor]:
    """Combine every rank's running means, weighted by how many inputs each rank saw; a
    shared entry is combined once and stays shared."""
    out, done = {}, {}
    for name in sorted(hessians):  # the same order on every rank
        key = id(hessians[name])
        if key not in done:
            H, n = hessians[name]
            total = backend.sum_over_ranks(torch.tensor([float(n)], dtype=torch.float64, device=H.device))
            done[key] = backend.sum_over_ranks(H * n) / float(total)
        out[name] = done[key]
    return out


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


def reconstruct_from(backend: Backend, hessians: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                     dense_of, blocksize: int = 128, percdamp: float = 0.01,
                     transposed: frozenset[str] = frozenset()) -> list[str]:
    """``compensate`` from ``dense_of(name)``, each layer's dense local weight (a copy), for
    every layer in ``hessians``: the pruned weights come back zero, the kept ones updated."""
    updated = []
    for name in sorted(hessians):
        weight = backend.local_weight(name)
        flip = name in transposed

        def update(w, mask, name=name):
            return [reconstruct_with_mask(w, hessians[name], mask, blocksize, percdamp)]

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
