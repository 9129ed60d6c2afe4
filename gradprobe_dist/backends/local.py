"""One process, one device: the reference every parallel mode must agree with."""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import Backend, LocalSlice


class LocalBackend(Backend):
    name = "none"
    replicated = True

    def prepare(self, model: nn.Module, param_names: list[str]) -> nn.Module:
        model.to(self.device)
        self._params = dict(model.named_parameters())
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        for p in self._params.values():
            p.grad = None

    def local_grad(self, name: str) -> torch.Tensor | None:
        return self._params[name].grad

    def local_weight(self, name: str) -> torch.Tensor:
        return self._params[name].data

    def local_slice(self, name: str) -> LocalSlice:
        return LocalSlice(self._params[name].shape, "full")
