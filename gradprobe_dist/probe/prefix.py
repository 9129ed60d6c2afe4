"""The frozen prefix of a stage: computed once per batch, replayed in the second pass.

When a stage probes blocks k.. of a block list, blocks 0..k-1 hold no probed weight and
nothing changes them between the two passes, so their output on a batch is the same in
both. The baseline pass records the output of block k-1 for every batch (detached, a
copy, on the CPU if asked); the reduced pass swaps blocks 0..k-1 for stand-ins that
return that recorded output, so the prefix runs once per batch instead of twice. The
backward already stops at block k: nothing before it requires a gradient. The blocks go
back in ``finally``.

The replay is exact (the same tensors, bit for bit) as long as block k reads only block
k-1's output and arguments the model computes outside the block list (masks, position
embeddings): true of Hugging Face decoder stacks and TinyGPT. The prefix is empty, and
nothing is recorded, when a probed weight lies outside the block list or inside block 0.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

CACHE_DEVICES = ("same", "cpu")


def block_list(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` (of more than one block) holding the most of ``names``, with its
    module name; None when no such list holds any."""
    best, best_count = None, 0
    for mname, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{mname}." if mname else ""
            count = sum(n.startswith(prefix) for n in names)
            if count > best_count:
                best, best_count = (mname, module), count
    return best


def frozen_prefix_length(model: nn.Module, names: list[str]) -> int:
    """How many leading blocks of the block list hold no weight named in ``names`` (0 when
    some named weight is outside the block list, which could feed the blocks)."""
    found = block_list(model, names)
    if found is None:
        return 0
    _, blocks = found
    params = dict(model.named_parameters())
    wanted = {id(params[n]) for n in names}
    in_blocks: set[int] = set()
    first = len(blocks)
    for index, block in enumerate(blocks):
        ids = {id(p) for p in block.parameters()}
        in_blocks |= ids
        if first == len(blocks) and ids & wanted:
            first = index
    return first if wanted <= in_blocks else 0


class FrozenPrefix:
    """Records the prefix's output per batch in one pass and replays it in another.

    ``select(index)`` before each forward says which calibration batch runs; ``recording()``
    and ``replaying()`` wrap a whole pass. With ``enabled=False`` (or an empty prefix) all
    three do nothing.
    """

    def __init__(self, model: nn.Module, names: list[str], *, enabled: bool = True,
                 device: str = "same"):
        if device not in CACHE_DEVICES:
            raise ValueError(f"prefix cache device {device!r} is unknown: use 'same' (where the "
                             "activations are) or 'cpu'")
        found = block_list(model, names)
        self.length = frozen_prefix_length(model, names) if enabled else 0
        self._blocks = found[1] if found is not None else None
        self._to_cpu = device == "cpu"
        self._outputs: dict[int, object] = {}
        self._index = 0
        self._loaded: tuple[int, object] | None = None

    def select(self, index: int) -> None:
        self._index = index

    @contextmanager
    def recording(self):
        """Keep a detached copy of the last prefix block's output for each selected batch."""
        if not self.length:
            yield
            return

        def keep(module, args, output):
            self._outputs[self._index] = tree_map(self._stored, output)

        handle = self._blocks[self.length - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def replaying(self):
        """Prefix blocks swapped for stand-ins returning the recorded output of the batch."""
        if not self.length:
            yield
            return
        originals = [self._blocks[i] for i in range(self.length)]
        try:
            for i in range(self.length):
                self._blocks[i] = _Recorded(self)
            yield
        finally:
            for i, block in enumerate(originals):
                self._blocks[i] = block
            self._loaded = None

    def recorded(self, device: torch.device | None):
        """The selected batch's recorded output, on ``device`` (moved once per batch)."""
        if self._index not in self._outputs:
            raise RuntimeError(f"no recorded prefix output for calibration batch {self._index}: "
                               "the reduced pass must replay the baseline pass's batches")
        if self._loaded is None or self._loaded[0] != self._index:
            output = self._outputs[self._index]
            if device is not None:
                output = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, output)
            self._loaded = (self._index, output)
        return self._loaded[1]

    def _stored(self, value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.detach().to("cpu", copy=True) if self._to_cpu else value.detach().clone()


class _Recorded(nn.Module):
    """Stands in for a prefix block: returns the recorded output of the last prefix block
    (whatever it is given), on the device its input lives on."""

    def __init__(self, prefix: FrozenPrefix):
        super().__init__()
        self._prefix = [prefix]  # a list, so nn.Module does not register it as a child

    def forward(self, *args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return self._prefix[0].recorded(first.device if first is not None else None)
