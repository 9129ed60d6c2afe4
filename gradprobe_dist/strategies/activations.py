"""Input-feature norms of prunable layers, collected by forward hooks (for Wanda).

A linear layer's input is [..., in_features] whichever way it stores its weight (nn.Linear
[out, in], GPT-2's Conv1D [in, out]); a convolution's input has channels in dim 1.

Hooks are registered and removed in one place, a context manager, removed in ``finally``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from gradprobe_dist.probe.params import stores_transposed


def _feature_sq_sum(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum over tokens (and spatial positions) of x_j^2 for each input feature j."""
    x = x.detach().float()
    if isinstance(module, nn.Linear) or stores_transposed(module):
        return x.reshape(-1, x.shape[-1]).pow(2).sum(0)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise ValueError(f"activation norms of grouped convolutions are not supported "
                             f"(groups={module.groups}); exclude that layer")
        dims = [0] + list(range(2, x.dim())) if x.dim() == module.weight.dim() else list(range(1, x.dim()))
        return x.pow(2).sum(dims)
    raise TypeError(f"cannot collect input norms for a {type(module).__name__}: Wanda-style "
                    "strategies need nn.Linear or nn.Conv layers")


@contextmanager
def collect_input_sq_norms(owners: dict[str, nn.Module]):
    """Yield a dict name -> running sum of x_j^2 over every token seen while inside."""
    norms: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs):
            s = _feature_sq_sum(module, inputs[0])
            norms[name] = norms[name] + s if name in norms else s
        return hook

    try:
        for name, module in owners.items():
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        yield norms
    finally:
        for h in handles:
            h.remove()
