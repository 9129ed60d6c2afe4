"""Load weights straight into a sharded model, so that no rank ever holds the whole model.

The model is built with its parameters on the meta device (``parameters_on_meta``; buffers
such as rotary tables stay real, since no checkpoint holds them), sharded, and then each
rank reads only its own part of every weight from the safetensors files
(``WeightReader.read_into``: rows for FSDP2's ``Shard(0)``, a flat range for ZeRO-3), cast to
the model's dtype. Peak memory per rank is its shard plus a few MiB in flight.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from gradprobe_dist.parallel.base import LocalSlice

READ_CHUNK_BYTES = 4 << 20
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
    a directory holding either), read part by part without loading a whole file.

    A file is mapped only while one of its tensors is read: ``safe_open`` maps the whole
    file, and every page read through a mapping that stays open stays resident (and counted
    in the process's RSS), so a reader holding its files open would end up holding this
    rank's part of the model twice.
    """

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

    @contextmanager
    def _stored(self, key: str):
        """The stored slice of ``key``; its file is unmapped once the slice and every tensor
        read from it are gone."""
        with safe_open(self.files[key], framework="pt") as f:
            yield f.get_slice(key)

    def dtype(self) -> torch.dtype:
        """The checkpoint's own precision: that of its first floating-point tensor."""
        for key in self.files:
            with self._stored(key) as stored:
                found = SAFETENSORS_DTYPES.get(stored.get_dtype())
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
        """Elements ``part.flat_range()`` of tensor ``key`` flattened (only the rows that hold
        them are read), in ``dtype``; in the stored dtype, a view of the mapped file."""
        with self._stored(key) as stored:
            shape = torch.Size(stored.get_shape())
            if shape != torch.Size(part.full_shape):
                raise ValueError(f"tensor {key} of the checkpoint has shape {list(shape)}, the model's "
                                 f"{list(part.full_shape)}: model.path does not hold this model's weights")
            start, stop = part.flat_range()
            if stop <= start:
                return torch.empty(0, dtype=dtype)
            if not shape:  # a scalar
                return stored[...].reshape(1).to(dtype)
            row = shape[1:].numel()
            first, last = start // row, -(-stop // row)
            flat = stored[first:last].reshape(-1)[start - first * row:stop - first * row]
        return flat.to(dtype)

    def read_into(self, key: str, part: LocalSlice, out: torch.Tensor) -> None:
        """Copy this rank's ``part`` of tensor ``key`` into ``out`` (contiguous, the part's
        size), ``READ_CHUNK_BYTES`` at a time: what is in flight beside ``out`` stays small
        however large the weight."""
        flat, (start, stop) = out.view(-1), part.flat_range()
        step = max(1, READ_CHUNK_BYTES // out.element_size())
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            flat[lo - start:hi - start].copy_(self.read(key, LocalSlice(part.full_shape, "flat", lo, hi), out.dtype))


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
        reader.read_into(reader.key_for(aliases), part_of(params[name]), local_of(params[name]))
    for name, buf in model.named_buffers():
        if name in reader.files:
            reader.read_into(name, LocalSlice(buf.shape, "full"), buf)
