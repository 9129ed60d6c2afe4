"""Calibration batches: taken once and replayed, and turned into a loss.

The original GradProbe iterated the DataLoader twice, so with ``shuffle=True`` its two
passes compared gradients of different data. Here the batches are taken once and both
passes replay that list in the same order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn

LossOfBatch = Callable[[nn.Module, object], torch.Tensor]


def take_batches(dataloader: Iterable, num_batches: int) -> list:
    """The first ``num_batches`` batches of ``dataloader`` (an error if it has fewer)."""
    batches = []
    for batch in dataloader:
        batches.append(batch)
        if len(batches) == num_batches:
            return batches
    if not batches:
        raise ValueError("the dataloader is empty: the probe needs num_batches calibration "
                         "batches; check the dataset and the DataLoader's drop_last/batch_size")
    raise ValueError(f"the dataloader gave only {len(batches)} batches but num_batches="
                     f"{num_batches}: lower num_batches to at most {len(batches)} or give more data")


def is_lm_batch(batch) -> bool:
    """The one rule telling batch kinds apart: a dict is a language-model batch
    (``input_ids``, ``labels``; the model computes its own loss), anything else is a
    classification ``(inputs, targets)`` pair."""
    return isinstance(batch, Mapping)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_loss_of_batch(loss_fn: Callable | None, compute_loss: LossOfBatch | None) -> LossOfBatch:
    """How a batch becomes a scalar loss.

    * ``compute_loss(model, batch)``: the user's own function, used as is;
    * ``(inputs, targets)`` tuples/lists: ``loss_fn(model(inputs), targets)``;
    * dicts with ``loss_fn=None``: the model's own loss, ``model(**batch).loss``
      (Hugging Face convention, ``labels`` in the dict);
    * dicts with ``loss_fn``: ``loss_fn(model(**inputs), batch["labels"])``.
    """
    if compute_loss is not None:
        return compute_loss

    def loss_of(model: nn.Module, batch) -> torch.Tensor:
        if is_lm_batch(batch):
            if loss_fn is None:
                return _model_loss(model(**batch))
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return loss_fn(_logits(model(**inputs)), batch["labels"])
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            if loss_fn is None:
                raise ValueError("batches are (inputs, targets) pairs but loss_fn is None: pass "
                                 "a loss such as nn.CrossEntropyLoss(), or compute_loss=")
            inputs, targets = batch
            return loss_fn(_logits(model(inputs)), targets)
        raise TypeError(f"cannot compute a loss from a batch of type {type(batch).__name__}: "
                        "use (inputs, targets) pairs, dicts with input_ids/labels, or pass "
                        "compute_loss=lambda model, batch: ...")

    return loss_of


def _model_loss(output) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("loss_fn is None but the model returned no loss: put 'labels' in the "
                         "batch dict, or pass loss_fn=")
    return loss


def _logits(output):
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return logits if logits is not None else output
