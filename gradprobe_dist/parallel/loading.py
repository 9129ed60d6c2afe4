"""Load weights straight into a sharded model, so that no rank ever holds the whole model.

The model is built with its parameters on the meta device (``parameters_on_meta``; buffers
such as rotary tables stay real, since no checkpoint holds them), sharded, and then each
rank reads only its own part of every weight from the safetensors files
(``WeightReader.read``: rows for FSDP2's ``Shard(0)``, a flat range for ZeRO-3), cast to
the model's dtype. Peak memory per rank is its shard plus one weight's part in flight.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from gradprobe_dist.parallel.base import LocalSlice

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@contextmanager
def parameters_on_meta():
    """Every parameter registered inside is moved to the meta device as it is created (one
    layer's storage exists at a time, briefly); buffers are left where they are made."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def real_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a meta-parameter model was built with, to put back after ``to_empty``."""
    return {name: buf for name, buf in model.named_buffers() if not buf.is_meta}


def restore_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], device: torch.device) -> None:
    modules = dict(model.named_modules())
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        modules[owner]._buffers[leaf] = buf.to(device)


class WeightReader:
    """The tensors of a safetensors checkpoint (one file, a sharded ``*.index.json`` set, or
    a directory holding either), read part by part without loading a whole file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            path = index if index.is_file() else path / "model.safetensors"
        if path.name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            self.files = {key: path.parent / file for key, file in weight_map.items()}
        elif path.suffix == ".safetensors" and path.is_file():
            with safe_open(path, framework="pt") as f:
                self.files = {key: path for key in f.keys()}
        else:
            raise FileNotFoundError(f"no safetensors weights at {path}: point model.path at a "
                                    "model directory or a .safetensors file")
        self._open: dict[Path, object] = {}

    def _handle(self, key: str):
        file = self.files[key]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file]

    def dtype(self) -> torch.dtype:
        """The checkpoint's own precision: that of its first floating-point tensor."""
        for key in self.files:
            found = SAFETENSORS_DTYPES.get(self._handle(key).get_slice(key).get_dtype())
            if found is not None:
                return found
        return torch.float32

    def key_for(self, aliases: list[str]) -> str:
        """The stored key of a parameter known by ``aliases`` (a tied weight has several)."""
        for name in aliases:
            if name in self.files:
                return name
        raise ValueError(f"the checkpoint has no tensor for parameter {aliases[0]} (known keys e.g. "
                         f"{sorted(self.files)[:3]}): model.path does not hold this model's weights")

    def read(self, key: str, part: LocalSlice, dtype: torch.dtype) -> torch.Tensor:
        """This rank's ``part`` of tensor ``key`` (rows, flat range or whole), in ``dtype``."""
        stored = self._handle(key).get_slice(key)
        shape = torch.Size(stored.get_shape())
        if shape != torch.Size(part.full_shape):
            raise ValueError(f"tensor {key} of the checkpoint has shape {list(shape)}, the model's "
                             f"{list(part.full_shape)}: model.path does not hold this model's weights")
        if part.layout == "full":
            tensor = stored[:]
        elif part.layout == "rows":
            tensor = stored[part.start:part.stop] if part.stop > part.start else torch.empty(
                (0, *shape[1:]), dtype=SAFETENSORS_DTYPES[stored.get_dtype()])
        else:
            row = shape[1:].numel() if len(shape) > 1 else 1
            first, last = part.start // row, -(-part.stop // row)
            rows = stored[first:last] if part.stop > part.start else stored[0:0]
            tensor = rows.reshape(-1)[part.start - first * row: part.stop - first * row]
        return tensor.to(dtype)


def aliases_of(model: nn.Module) -> dict[str, list[str]]:
    """``{name in named_parameters(): every name of that parameter}`` (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {names[0]: names for names in by_id.values()}


@torch.no_grad()
def fill_local_parts(model: nn.Module, reader: WeightReader, part_of, local_of) -> None:
    """Copy each parameter's local part from the checkpoint, in the parameter's dtype:
    ``part_of(param)`` says which part (a ``LocalSlice``), ``local_of(param)`` is the tensor
    to fill. Buffers the checkpoint holds (persistent ones) are read whole."""
    params = dict(model.named_parameters())
    for name, aliases in aliases_of(model).items():
        local = local_of(params[name])
        local.copy_(reader.read(reader.key_for(aliases), part_of(params[name]), local.dtype))
    for name, buf in model.named_buffers():
        if name in reader.files:
            buf.copy_(reader.read(name, LocalSlice(buf.shape, "full"), buf.dtype))
