"""DeepSpeed ZeRO-3: every rank holds a flat 1-D slice of each weight, its gradient and
its fp32 master copy.

ZeRO-3 stores ``weight.flatten()`` cut into ``world_size`` equal parts, the last one
padded; ``p.ds_tensor`` is this rank's part and every forward all-gathers the parts.
The probe works on that part directly: gradients come from the optimizer's partitioned
buffers (``safe_get_local_grad``, already rank-averaged by the reduce-scatter), weights
are a view of ``ds_tensor`` with the padding cut off. Three settings make in-place edits
of ``ds_tensor`` reach the next forward: no parameter stays gathered between forwards
(persistence threshold and reuse distance 0), and ``commit_weights`` copies the edits
into the fp32 master so that nothing rebuilds ``ds_tensor`` from stale values.

The engine needs an optimizer for its backward; it gets SGD with lr 0 and ``step()`` is
never called, so no weight ever moves except by the probe's own edits.

Sharded loading (``load_sharded``): the model comes built with its parameters on the meta
device; one by one, largest first, each is allocated and handed to
``deepspeed.zero.Init(module=...)``, which partitions it at once (one weight exists whole at
a time), and each rank then reads only the rows of the safetensors file that cover its flat
partition. ``deepspeed.initialize`` finds every parameter already partitioned
and does not convert or broadcast it again; its stage-3 optimizer still gathers each
trainable weight once, one at a time, to hook its gradient, as it does for any model.
"""
from __future__ import annotations

import time

import deepspeed
import torch
import torch.nn as nn
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_local_grad, safe_set_local_fp32_param

from gradprobe_dist.parallel.base import Backend, LocalSlice
from gradprobe_dist.parallel.collectives import ProcessGroup, gather_flat, scatter_flat
from gradprobe_dist.parallel.loading import WeightReader, fill_local_parts, real_buffers, restore_buffers
from gradprobe_dist.probe.validation import is_int
from gradprobe_dist.runtime.log import get_logger

log = get_logger(__name__)


#: elements per gradient-reduction bucket (64 MiB of fp32)
BUCKET_ELEMENTS = 2**24


def zero3_config(micro_batch_size: int) -> dict:
    """The DeepSpeed config under which local edits are seen by the next forward."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,  # bookkeeping only
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,  # a torch SGD, so no fused op is JIT-built
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # no small weight stays gathered
            "stage3_max_reuse_distance": 0,  # nothing is kept gathered for reuse
            # DeepSpeed's default (5e8 elements) is a 2 GB gradient bucket, of which a backward
            # touches every trainable weight's worth before it reduces
            "reduce_bucket_size": BUCKET_ELEMENTS,
        },
    }


class Zero3Backend(Backend):
    name = "zero3"
    replicated = False

    def __init__(self, device: torch.device | str | None = None, micro_batch_size: int = 1):
        if not is_int(micro_batch_size) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}: "
                             "pass the number of samples each rank feeds per forward")
        collectives = ProcessGroup()
        deepspeed.init_distributed(dist_backend=str(torch.distributed.get_backend()))  # adopts the group
        if device is None:
            device = deepspeed.get_accelerator().current_device_name()
        super().__init__(device, collectives)
        self.micro_batch_size = micro_batch_size
        self._engine = None
        self._model: nn.Module | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._trainable_at_init: set[str] = set()
        self._requires_grad_before: dict[str, bool] = {}
        self._has_grads = False

    # -- model ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        """Build the engine on the first call (reused afterwards) and freeze every weight
        that is not probed, so that the backward neither computes nor reduces its grad."""
        if self._engine is None:
            self._build_engine(model)
        elif model is not self._model and model is not self._engine:
            raise ValueError("this Zero3Backend already wraps another model in a DeepSpeed engine: "
                             "create a new Zero3Backend for a different model")
        self._check_names(param_names)
        self.release()
        self._requires_grad_before = {n: p.requires_grad for n, p in self._params.items()}
        wanted = set(param_names)
        for name in self._trainable_at_init:
            self._params[name].requires_grad_(name in wanted)
        return self._engine

    def load_sharded(self, model: nn.Module, param_names: list[str], reader: WeightReader) -> None:
        """Partition ``model`` (parameters on the meta device) as ZeRO-3 does, then read each
        rank's flat partition of every weight from ``reader``: no rank ever holds the model."""
        restore_buffers(model, real_buffers(model), self.device)  # the engine will not move a partitioned model
        self._partition_largest_first(model)
        fill_local_parts(model, reader, self._flat_slice, self._unpadded)

    def _partition_largest_first(self, model: nn.Module) -> None:
        """Allocate the meta parameters one at a time, largest first, each partitioned by
        ``zero.Init`` before the next exists: at most one weight is whole at a time, and the
        largest while little else is held. A tied parameter is one, wherever it is used. The
        partition's padding, never loaded, is zeroed (``local_part`` shows it)."""
        places: dict[int, tuple[nn.Parameter, list]] = {}  # id(meta): (meta, [(module, key), ...])
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None and param.is_meta:
                    places.setdefault(id(param), (param, []))[1].append((module, key))
        config = zero3_config(self.micro_batch_size)
        for meta, where in sorted(places.values(), key=lambda item: -item[0].numel()):  # the same order on every rank
            holder = nn.Module()
            holder.weight = nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype, device=self.device),
                                         requires_grad=meta.requires_grad)
            deepspeed.zero.Init(module=holder, config_dict_or_path=config)
            for module, key in where:
                module._parameters[key] = holder.weight
            start, stop = self._flat_range(holder.weight)
            holder.weight.ds_tensor[stop - start:].zero_()

    def _build_engine(self, model: nn.Module) -> None:
        started = time.perf_counter()
        self._engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            config=zero3_config(self.micro_batch_size),
        )
        self._model = model
        self._params = dict(self._engine.module.named_parameters())
        self._trainable_at_init = {n for n, p in self._params.items() if p.requires_grad}
        if self.is_main:
            log.info("built the ZeRO-3 engine over %d ranks in %.1f s",
                     self.world_size, time.perf_counter() - started)

    def _check_names(self, param_names: list[str]) -> None:
        unknown = [n for n in param_names if n not in self._params]
        if unknown:
            raise ValueError(f"unknown parameter names {unknown[:5]}: use names from "
                             "model.named_parameters() of the unwrapped model")
        frozen = [n for n in param_names if n not in self._trainable_at_init]
        if frozen:
            raise ValueError(f"parameters {frozen[:5]} had requires_grad=False when the ZeRO-3 engine "
                             "was built, so DeepSpeed gives them no gradient: set requires_grad=True "
                             "on every weight to probe before the first prepare")

    def release(self) -> None:
        """Give back the requires_grad flags ``prepare`` changed; the engine itself stays."""
        for name, requires_grad in self._requires_grad_before.items():
            self._params[name].requires_grad_(requires_grad)
        self._requires_grad_before = {}

    def close(self) -> None:
        """Wait for in-flight parameter gathers and release them, then remove the engine's
        hooks: left to interpreter exit, they die in arbitrary order with the gloo threads."""
        if self._engine is not None:
            self._engine.empty_partition_cache()
            self._engine.destroy()
        self._engine, self._model, self._params = None, None, {}

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)
        self._has_grads = True

    def zero_grad(self) -> None:
        """Reset the optimizer's micro-step counter so that the next backward overwrites the
        partitioned gradient buffers instead of accumulating into them."""
        self._engine.optimizer.zero_grad()
        self._has_grads = False

    def local_grad(self, name: str) -> torch.Tensor | None:
        """A copy (the buffer is overwritten by the next backward), padding cut off."""
        param = self._params[name]
        if not self._has_grads or not param.requires_grad:
            return None
        start, stop = self._flat_range(param)
        return safe_get_local_grad(param)[: stop - start].clone()

    def local_weight(self, name: str) -> torch.Tensor:
        return self._unpadded(self._params[name])

    def local_slice(self, name: str) -> LocalSlice:
        return self._flat_slice(self._params[name])

    def _unpadded(self, param: nn.Parameter) -> torch.Tensor:
        start, stop = self._flat_range(param)
        return param.ds_tensor.narrow(0, 0, stop - start)

    def _flat_slice(self, param: nn.Parameter) -> LocalSlice:
        start, stop = self._flat_range(param)
        return LocalSlice(param.ds_shape, "flat", start, stop)

    def local_part(self, param: nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.detach()

    def gather_parameter(self, param: nn.Parameter) -> torch.Tensor | None:
        if not hasattr(param, "ds_tensor"):
            return super().gather_parameter(param)
        layout = self._flat_slice(param)
        flat = gather_flat(self._unpadded(param), layout.start, layout.stop, layout.full_numel, dst=0)
        return None if flat is None else flat.reshape(layout.full_shape)

    def _flat_range(self, param: nn.Parameter) -> tuple[int, int]:
        """This rank's unpadded [start, stop) in ``weight.flatten()``; empty past the end."""
        part = param.ds_tensor.ds_numel
        start = min(self.rank * part, param.ds_numel)
        return start, min(start + part, param.ds_numel)

    def commit_weights(self, names: list[str]) -> None:
        """Copy the edited partitions into the fp32 master, and drop any gathered copy so
        the next forward gathers the edited partitions."""
        params = [self._params[n] for n in names]
        for param in params:
            safe_set_local_fp32_param(param, param.ds_tensor)
        gathered = [p for p in params if p.ds_status is not ZeroParamStatus.NOT_AVAILABLE]
        if gathered:
            gathered[0].partition(param_list=gathered)

    # -- sharded layouts -----------------------------------------------------------------
    def gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor | None:
        layout = self.local_slice(name)
        flat = gather_flat(local, layout.start, layout.stop, layout.full_numel, dst=0)
        return None if flat is None else flat.reshape(layout.full_shape)

    def scatter_full(self, name: str, full: torch.Tensor | None) -> torch.Tensor:
        layout = self.local_slice(name)
        return scatter_flat(full, layout.start, layout.stop, src=0, device=self.device)
