"""Reconstruction after the probe: let the surviving weights compensate for the pruned ones.

Once a layer's mask is decided, SparseGPT's Optimal-Brain-Surgeon update with the mask held
fixed (``reconstruct.reconstruct_with_mask``) moves the kept weights to reduce the layer's
output error on the calibration inputs. It needs ``H = 2 X X^T`` of each layer's inputs,
collected by forward hooks during the baseline pass (no extra pass) and averaged over ranks.
Rows are independent given H, so FSDP2 row shards update locally; ZeRO-3's flat partitions
are gathered one layer at a time on the main rank.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.decision import ProbeRecord
from gradprobe_dist.reconstruct.obs import accumulate_hessian, reconstruct_with_mask


@contextmanager
def collect_input_hessians(owners: dict[str, nn.Module]):
    """Yield name -> [H, n_seen] running means of 2 x x^T for every nn.Linear in ``owners``."""
    hessians: dict[str, list] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            if name not in hessians:
                hessians[name] = [torch.zeros(x.shape[-1], x.shape[-1], device=x.device), 0]
            entry = hessians[name]
            entry[1] = accumulate_hessian(entry[0], x, entry[1])
        return hook

    try:
        for name, module in owners.items():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_pre_hook(make_hook(name)))
        yield hessians
    finally:
        for h in handles:
            h.remove()


def average_over_ranks(hessians: dict[str, list], backend: Backend) -> dict[str, torch.Tensor]:
    """Combine every rank's running means, weighted by how many inputs each rank saw."""
    out = {}
    for name in sorted(hessians):  # the same order on every rank
        H, n = hessians[name]
        total = backend.all_reduce(torch.tensor([float(n)], dtype=torch.float64, device=H.device), "sum")
        out[name] = backend.all_reduce(H * n, "sum") / float(total)
    return out


def compensate(backend: Backend, record: ProbeRecord, masks: dict[str, torch.Tensor],
               blocksize: int = 128, percdamp: float = 0.01) -> list[str]:
    """Prune ``masks`` from the dense weights (the probe's saved originals put back) with the
    OBS update of every layer that has a Hessian; returns the names updated."""
    updated = []
    hessians = record.hessians or {}
    for name in sorted(hessians):
        where = backend.local_slice(name)
        weight = backend.local_weight(name)
        rows = where.full_shape[0]
        layer = record.layers[name]
        with torch.no_grad():
            dense = weight.clone()
            dense[layer.tentative] = layer.originals.to(dense.device)
            if where.layout == "flat":
                full_w = backend.gather_full(name, dense)
                full_m = backend.gather_full(name, masks[name])
                new = None
                if full_w is not None:
                    new = reconstruct_with_mask(full_w.reshape(rows, -1), hessians[name],
                                                full_m.reshape(rows, -1), blocksize, percdamp)
                weight.copy_(backend.scatter_full(name, new.reshape(where.full_shape) if new is not None else None))
            elif weight.shape[0] > 0:
                new = reconstruct_with_mask(dense.reshape(weight.shape[0], -1), hessians[name],
                                            masks[name].reshape(weight.shape[0], -1), blocksize, percdamp)
                weight.copy_(new.reshape(weight.shape))
        updated.append(name)
    backend.commit_weights(updated)
    return updated
