"""Mask files: a BoolTensor packed 1 bit per element into a safetensors file (True means
pruned), with optional extra tensors (e.g. gradient ratios for plots); masks applied to a model."""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from gradprobe_dist.checkpoint.format import FORMAT_VERSION

BITS_KEY = "mask_bits"
SHAPE_KEY = "mask_shape"
_METADATA_KEY = "gradprobe"


def layer_file_name(name: str) -> str:
    """A safe file name for a layer; names that had to be altered get a hash so they stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if safe != name or len(safe) > 200:
        safe = f"{safe[:200]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return f"{safe}.safetensors"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A CPU BoolTensor as uint8, 1 bit per element, little-endian within each byte."""
    bits = np.packbits(mask.reshape(-1).numpy(), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64))
    flat = np.unpackbits(bits.numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(flat).reshape(shape)


def pack_local(mask: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.device]:
    """A mask set aside at one bit per weight on the CPU (a bool mask is a byte per weight
    whatever the model's dtype), with what ``unpack_local`` needs to give it back."""
    return pack_mask(mask.cpu()), list(mask.shape), mask.device


def unpack_local(packed: tuple[torch.Tensor, list[int], torch.device]) -> torch.Tensor:
    bits, shape, device = packed
    return unpack_mask(bits, shape).to(device)


def encode_layer(name: str, mask: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The bytes of one layer file. Deterministic: safetensors writes a metadata dict in hash
    order, so the metadata is one key holding sorted JSON, and equal runs give equal bytes."""
    payload = {
        BITS_KEY: pack_mask(mask),
        SHAPE_KEY: torch.tensor(list(mask.shape), dtype=torch.int64),
        **{key: t.detach().cpu().contiguous() for key, t in tensors.items()},
    }
    metadata = json.dumps({"format_version": FORMAT_VERSION, "layer": name}, sort_keys=True)
    return safetensors_save(payload, metadata={_METADATA_KEY: metadata})


def decode_layer(data: bytes) -> tuple[torch.Tensor, list[int], dict[str, torch.Tensor]]:
    """(packed bits, shape, extra tensors) of one layer file's bytes."""
    tensors = safetensors_load(data)
    return tensors.pop(BITS_KEY), tensors.pop(SHAPE_KEY).tolist(), tensors


def apply_masks(
    model: nn.Module, directory_or_masks: str | os.PathLike | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Zero the masked weights of ``model`` in place; returns the masks applied.

    ``model`` must be unwrapped and unsharded (plain tensors, names without ``module.``).
    Every name and shape is checked before any weight changes.
    """
    if isinstance(directory_or_masks, (str, os.PathLike)):
        from gradprobe_dist.checkpoint.store import load_masks  # the store reads mask files

        masks = load_masks(directory_or_masks)
    else:
        masks = dict(directory_or_masks)
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(
            f"masks name parameters the model does not have: {unknown}; pass the unwrapped "
            "model the masks were computed for"
        )
    wrong = [
        f"'{name}' (mask {getattr(mask, 'dtype', type(mask).__name__)} "
        f"{list(getattr(mask, 'shape', []))}, parameter {list(params[name].shape)})"
        for name, mask in masks.items()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
        or mask.shape != params[name].shape
    ]
    if wrong:
        raise ValueError(
            "masks must be BoolTensors of their parameter's shape; these are not: "
            + ", ".join(wrong) + "; pass the masks computed for this model"
        )
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask.to(params[name].device), 0)
    return masks
