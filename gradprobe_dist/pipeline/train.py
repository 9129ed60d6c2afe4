"""Train the configured model on shard data (one process): the demo's subject before pruning.

No pretrained LM can be downloaded on an offline machine, so the demo trains a small one
on the bundled text first; a pruner needs a model that has learnt something to damage.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from gradprobe_dist.data.loader import shard_batches, read_shard_set, token_vocab_size
from gradprobe_dist.probe.batches import is_lm_batch
from gradprobe_dist.runtime.log import get_logger

log = get_logger(__name__)


def train_model(model: nn.Module, shards: str, *, steps: int, micro_batch_size: int,
                lr: float = 3e-3, weight_decay: float = 0.01, seed: int = 0,
                show_progress: bool = True) -> dict[str, float]:
    """AdamW with warm-up and cosine decay over every sample of ``shards``, cycled; the
    progress bar only on a terminal (in a log file its redraws are noise)."""
    total = sum(read_shard_set(shards).num_samples)
    num_batches = total // micro_batch_size
    if num_batches < 1:
        raise ValueError(f"{shards} holds {total} samples, fewer than micro_batch_size={micro_batch_size}")
    batches = shard_batches(shards, micro_batch_size=micro_batch_size, num_batches=num_batches,
                                  vocab_size=token_vocab_size(model))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order = torch.randperm(num_batches * math.ceil(steps / num_batches),
                           generator=torch.Generator().manual_seed(seed)) % num_batches
    model.train()
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc="train", disable=not (show_progress and sys.stderr.isatty())):
        batch = batches[int(order[step])]
        opt.zero_grad(set_to_none=True)
        if is_lm_batch(batch):
            loss = model(**batch).loss
        else:
            loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return {"final_train_loss": float(loss.detach()), "seconds": time.perf_counter() - start, "steps": steps}
