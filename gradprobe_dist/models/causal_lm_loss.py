"""A causal-LM loss that keeps no float32 copy of the logits.

transformers' ``ForCausalLMLoss`` upcasts the whole ``[tokens, vocab]`` logits to float32
and ``cross_entropy`` saves their float32 log-softmax for the backward: with SmolLM2's
49,152 classes and 4 x 128 tokens that is 96 MiB upcast, 96 MiB saved and as much again
for the gradient, whatever the model's dtype (the largest float32 tensors of a bf16 prune).
``causal_lm_loss`` computes the same mean cross-entropy a block of rows at a time, in
float32 as transformers does, and saves only the logits themselves (alive anyway) and one
log-sum-exp per token; the backward rebuilds each block's softmax. The same numbers up to
float rounding, the float32 work bounded by one block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: float32 elements of logits handled at once (4 MiB): smaller blocks were also faster here
#: (SmolLM2's 512 x 49,152 logits, forward+backward on one CPU thread: 220 ms at 4 MiB, 321
#: ms at 32 MiB in float32; 188 against 296 ms in bfloat16)
BLOCK_ELEMENTS = 1 << 20


class _CrossEntropyByBlocks(torch.autograd.Function):
    """Sum over rows of ``logsumexp(logits) - logits[target]`` (rows whose target is
    ``ignore_index`` left out), divided by ``divisor``; float32 one block of rows at a time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                divisor: torch.Tensor) -> torch.Tensor:
        rows = max(1, BLOCK_ELEMENTS // logits.shape[1])
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            torch.logsumexp(logits[start:start + rows].float(), dim=1, out=lse[start:start + rows])
        valid = targets != ignore_index
        picked = logits.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1).float()
        loss = torch.where(valid, lse - picked, 0.0).sum() / divisor
        ctx.save_for_backward(logits, targets, lse, divisor)
        ctx.rows = rows
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, lse, divisor = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        scale = grad_loss.float() / divisor
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            end = min(start + ctx.rows, logits.shape[0])
            probs = logits[start:end].float().sub(lse[start:end, None]).exp_()  # softmax
            rows_valid = valid[start:end]
            probs[torch.arange(end - start, device=probs.device), torch.where(rows_valid, targets[start:end], 0)] -= 1.0
            probs.mul_(torch.where(rows_valid, scale, 0.0).unsqueeze(1))
            grad[start:end] = probs
        return grad, None, None, None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``transformers.loss.loss_utils.ForCausalLMLoss`` (same arguments, same value up to
    float rounding) without its float32 copy of the logits."""
    if shift_labels is None:  # tokens < n predict token n
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(flat.device)
    if num_items_in_batch is None:  # a mean over the counted tokens, as cross_entropy's
        divisor = (targets != ignore_index).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=flat.device).float()
    return _CrossEntropyByBlocks.apply(flat, targets, ignore_index, divisor)


def use_causal_lm_loss(model: nn.Module) -> bool:
    """Give a Hugging Face model ``causal_lm_loss`` where it would use transformers' own
    ``ForCausalLMLoss`` (any other loss is left alone); returns whether it did."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return False
    model.loss_function = causal_lm_loss
    return True
