"""What the cost benchmark times: seeded models with their batches and loss, built the same
way in every process (ranks rebuild them from the spec), and a way to undo a prune."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.lib.corpus import consecutive_windows, lm_batches, shakespeare_bytes
from gradprobe_dist import SimpleMLP
from gradprobe_dist.models import TinyGPT, TinyGPTConfig
from gradprobe_dist.probe.params import find_prunable


@dataclass(frozen=True)
class MLPSpec:
    """A SimpleMLP and the synthetic batches it is timed on (cost does not depend on the data)."""

    input_dim: int
    hidden: tuple[int, ...]
    classes: int
    micro_batch: int
    num_batches: int


@dataclass
class Workload:
    """A model, its calibration batches and how a batch becomes a loss."""

    name: str
    model: nn.Module
    batches: list
    loss_of: Callable[[nn.Module, object], torch.Tensor]


def count_prunable(model: nn.Module) -> int:
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in find_prunable(model))


def gpt_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def classifier_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def text_batches(split: str, block_size: int, micro_batch: int, count: int) -> list[dict]:
    """Back-to-back byte windows of the bundled Shakespeare excerpt, as LM batches."""
    return lm_batches(consecutive_windows(shakespeare_bytes(split, "bundled"), count * micro_batch, block_size),
                      micro_batch)


def gpt_workload(gpt: dict, micro_batch: int, num_batches: int) -> Workload:
    """A seeded TinyGPT (``gpt``: TinyGPTConfig fields) on the bundled training text."""
    torch.manual_seed(0)
    dims = ", ".join(f"{k} {v}" for k, v in gpt.items())
    return Workload(f"TinyGPT ({dims}), micro-batch {micro_batch}", TinyGPT(TinyGPTConfig(**gpt)),
                    text_batches("train", gpt["block_size"], micro_batch, num_batches), gpt_loss)


def mlp_workload(spec: MLPSpec, data_seed: int = 0) -> Workload:
    """Weights seeded identically everywhere; ``data_seed`` (e.g. the rank) picks the batches."""
    torch.manual_seed(0)
    model = SimpleMLP(spec.input_dim, spec.hidden, spec.classes)
    gen = torch.Generator().manual_seed(1000 + data_seed)
    batches = [(torch.randn(spec.micro_batch, spec.input_dim, generator=gen),
                torch.randint(0, spec.classes, (spec.micro_batch,), generator=gen))
               for _ in range(spec.num_batches)]
    dims = "-".join(map(str, (spec.input_dim, *spec.hidden, spec.classes)))
    return Workload(f"SimpleMLP {dims}, micro-batch {spec.micro_batch}", model, batches, classifier_loss)


@contextmanager
def kept_weights(model: nn.Module):
    """Put every parameter back bit-exactly on exit (separate prunes each start from the same model)."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])
