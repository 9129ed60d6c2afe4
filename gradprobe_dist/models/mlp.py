"""SimpleMLP: the Linear+ReLU classifier of the original GradProbe README, for quick runs on MNIST-like data."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from gradprobe_dist.probe.validation import is_int


def _check_positive_int(name: str, value: object) -> None:
    if not is_int(value):
        raise TypeError(f"SimpleMLP {name} must be an int, got {type(value).__name__} {value!r}; pass a whole number")
    if value <= 0:
        raise ValueError(f"SimpleMLP {name} must be positive, got {value}; pass a size >= 1")


class SimpleMLP(nn.Module):
    """``input -> [Linear -> ReLU -> Dropout] * len(hidden_dims) -> Linear head`` returning logits.

    Inputs with more than two dims (e.g. ``(B, 1, 28, 28)`` images) are flattened to ``(B, -1)``.
    The hidden Linears live in ``layers`` and the output Linear is ``head``, so parameter names
    (``layers.0.weight``, ``head.weight``) do not shift when dropout changes.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (512, 256),
        output_dim: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        _check_positive_int("input_dim", input_dim)
        _check_positive_int("output_dim", output_dim)
        for i, dim in enumerate(hidden_dims):
            _check_positive_int(f"hidden_dims[{i}]", dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SimpleMLP dropout must be in [0, 1), got {dropout}; use 0.0 to disable it")

        self.input_dim = input_dim
        widths = (input_dim, *hidden_dims)
        self.layers = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], output_dim)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        if x.shape[-1] != self.input_dim:
            raise ValueError(
                f"SimpleMLP expected {self.input_dim} features per sample, got input of shape {tuple(x.shape)}; "
                f"build it with input_dim={x.shape[-1]} or reshape the input"
            )
        for layer in self.layers:
            x = self.dropout(self.activation(layer(x)))
        return self.head(x)
