"""Keeping pruned weights at zero, and the torch.nn.utils.prune convention.

``keep_pruned(owners, masks)`` zeroes the masked weights and installs two hooks per weight:
a gradient hook that zeroes the gradient of pruned entries (so no optimizer builds momentum
or moves them) and a forward pre-hook that re-applies the mask (so an optimizer whose
earlier state or whose update does not vanish with the gradient still cannot revive them
for the next forward). Weight decay of 0 is 0, so AdamW/SGD leave them exactly at zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune


class MaskHooks:
    """Handles of the hooks that keep masked weights at zero; ``remove()`` undoes them."""

    def __init__(self):
        self._handles = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def keep_pruned(params: dict[str, nn.Parameter], owners: dict[str, nn.Module],
                masks: dict[str, torch.Tensor]) -> MaskHooks:
    """Zero ``params[name][masks[name]]`` now and keep it zero through training."""
    hooks = MaskHooks()
    for name, mask in masks.items():
        param = params[name]
        mask = mask.to(param.device)
        with torch.no_grad():
            param.masked_fill_(mask, 0)
        hooks._handles.append(param.register_hook(lambda g, m=mask: g.masked_fill(m, 0)))

        def reapply(module, inputs, p=param, m=mask):
            with torch.no_grad():
                p.masked_fill_(m, 0)

        hooks._handles.append(owners[name].register_forward_pre_hook(reapply))
    return hooks


def _split(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def to_torch_prune(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-parametrise each masked weight as ``weight_orig * weight_mask`` (torch.nn.utils.prune)."""
    for name, mask in masks.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        torch_prune.custom_from_mask(module, attr, (~mask).to(getattr(module, attr).device))


def from_torch_prune(model: nn.Module) -> dict[str, torch.Tensor]:
    """Undo ``to_torch_prune`` (or any torch pruning): fold the masks into plain weights and
    return them in our convention (True = pruned)."""
    masks = {}
    for module_name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                attr = hook._tensor_name
                mask = getattr(module, f"{attr}_mask") == 0
                torch_prune.remove(module, attr)
                masks[f"{module_name}.{attr}" if module_name else attr] = mask
    return masks


def semi_structured(weight: torch.Tensor, mask: torch.Tensor):
    """A 2:4-pruned weight as torch's semi-structured sparse tensor (for sparse kernels).

    ``torch.sparse.to_sparse_semi_structured`` wants the dense weight with exactly two zeros
    in every group of four along the input dim, on a CUDA device, in fp16/bf16/int8; the
    pattern is checked here first so a wrong mask fails with a clear message.
    """
    from gradprobe_dist.probe.decision import check_nm

    check_nm(mask, 2, 4, exact=True)
    return torch.sparse.to_sparse_semi_structured(weight.detach().masked_fill(mask.to(weight.device), 0))
