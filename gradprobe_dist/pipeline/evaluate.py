"""Quality of a (pruned) model on held-out batches: perplexity for LMs, accuracy otherwise."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.batches import is_lm_batch, to_device


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, backend: Backend) -> dict[str, float]:
    """Token-weighted loss/perplexity (dict batches) or accuracy ((inputs, targets) batches),
    summed over every rank's batches."""
    was_training = model.training
    model.eval()
    try:
        totals = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            batch = to_device(batch, backend.device)
            if is_lm_batch(batch):
                out = model(**batch)
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                totals += torch.tensor([float(out.loss) * tokens, tokens], dtype=torch.float64)
            else:
                inputs, targets = batch
                logits = model(inputs)
                totals += torch.tensor([float((logits.argmax(-1) == targets).sum()), targets.numel()],
                                       dtype=torch.float64)
        totals = backend.all_reduce(totals.to(backend.device), "sum").cpu()
    finally:
        model.train(was_training)
    if is_lm_batch(batches[0]):
        loss = float(totals[0] / totals[1])
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(totals[1])}
    return {"accuracy": float(totals[0] / totals[1]), "samples": int(totals[1])}
