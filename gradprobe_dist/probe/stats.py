"""Per-weight gradient statistics folded over calibration batches (pure tensor code).

``max_abs`` (the original GradProbe's choice): element-wise max of |grad| over batches.
``mean_abs``: mean of |grad|.  ``rms``: sqrt(mean(grad^2)).
"""
from __future__ import annotations

import torch

STATISTICS = ("max_abs", "mean_abs", "rms")


def check_statistic(name: str) -> None:
    if name not in STATISTICS:
        raise ValueError(f"unknown gradient statistic {name!r}: choose one of {', '.join(STATISTICS)}")


def new_accumulator(like: torch.Tensor, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=dtype, device=device if device is not None else like.device)


def accumulate(acc: torch.Tensor, grad: torch.Tensor, statistic: str) -> None:
    """Fold one batch's gradient into ``acc`` in place."""
    g = grad.detach().to(device=acc.device, dtype=acc.dtype)
    if statistic == "max_abs":
        torch.maximum(acc, g.abs(), out=acc)
    elif statistic == "mean_abs":
        acc.add_(g.abs())
    else:  # rms
        acc.addcmul_(g, g)


def finalize(acc: torch.Tensor, statistic: str, num_batches: int) -> torch.Tensor:
    """Turn the running fold into the statistic (in place where possible)."""
    if statistic == "mean_abs":
        return acc.div_(num_batches)
    if statistic == "rms":
        return acc.div_(num_batches).sqrt_()
    return acc
