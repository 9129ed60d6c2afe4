"""One process, one device: the reference every parallel mode must agree with."""
from __future__ import annotations

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend, LocalSlice, drop_grads, freeze_all_but, restore_requires_grad


class LocalBackend(Backend):
    name = "none"
    replicated = True

    def __init__(self, device: torch.device | str | None = None):
        super().__init__(device)
        self._params: dict[str, nn.Parameter] = {}
        self._saved_requires_grad: dict[str, bool] | None = None

    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        """Place the model; only the probed weights keep ``requires_grad`` (backward then
        skips embedding, norm and bias gradients nobody reads); ``release`` restores it."""
        model.to(self.device)
        self._params = dict(model.named_parameters())
        self._saved_requires_grad = freeze_all_but(self._params, param_names)
        return model

    def release(self) -> None:
        restore_requires_grad(self._params, self._saved_requires_grad)
        self._saved_requires_grad = None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        drop_grads(self._params)

    def local_grad(self, name: str) -> torch.Tensor | None:
        return self._params[name].grad

    def local_weight(self, name: str) -> torch.Tensor:
        return self._params[name].detach()

    def local_slice(self, name: str) -> LocalSlice:
        return LocalSlice(self._params[name].shape, "full")
