"""Loss-change estimates from the probe's two passes (issue #12's "better comparison statistic").

The probe is a finite-difference Hessian-vector product. With the signed mean gradients
``g0`` at the weights ``w`` and ``g1`` after the candidates S were scaled to ``r * w``,
``g1 - g0 ~ H (r - 1) w_S``, so along the straight path between the two points the gradient
is linear in a quadratic model of the loss, and two per-weight estimates follow:

- ``removal_estimate``: the loss change of taking a candidate all the way to zero, the
  second-order Taylor form with the secant for the curvature,
  ``-w (g0 + (g1 - g0) / (2 (1 - r)))``. Summed over S it is exactly
  ``-g0.w_S + 1/2 w_S^T H w_S``, the loss change of zeroing every candidate at once,
  when the loss is quadratic (a test checks this on a linear least-squares model).
- ``path_estimate``: the trapezoid rule for the move the probe actually made,
  ``-(1 - r) w (g0 + g1) / 2``; summed over S (and all ranks) it predicts the change
  between the two passes' mean losses, which the passes measure: ``pass_loss_check``
  compares the two, so a user sees how far the quadratic picture holds on their model.

Each weight's share is an attribution of a joint move (all of S scaled together), not the
effect of removing that weight alone. Pure functions of a ``ProbeRecord``; the sums over
ranks go through the backend.
"""
from __future__ import annotations

import torch

from gradprobe_dist.parallel.base import Backend
from gradprobe_dist.probe.record import LayerProbe, ProbeRecord


def _signed(layer: LayerProbe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if layer.old_signed is None or layer.new_signed is None:
        raise ValueError("loss-change estimates need the signed mean gradients of both passes: "
                         "probe(..., signed_gradients=True)")
    g0 = layer.old_signed.float()  # on the statistic's device (``stat_device``), as the weights' copy need not be
    return layer.originals.to(g0.device).float(), g0, layer.new_signed.to(g0.device).float()


def removal_estimate(layer: LayerProbe, reduction_factor: float) -> torch.Tensor:
    """Estimated loss change of zeroing each candidate (float32, candidate order)."""
    w, g0, g1 = _signed(layer)
    return -w * (g0 + (g1 - g0) / (2.0 * (1.0 - reduction_factor)))


def path_estimate(layer: LayerProbe, reduction_factor: float) -> torch.Tensor:
    """Each candidate's share of the loss change between the two passes (trapezoid rule)."""
    w, g0, g1 = _signed(layer)
    return -(1.0 - reduction_factor) * w * (g0 + g1) / 2.0


def pass_loss_check(backend: Backend, record: ProbeRecord) -> dict[str, float]:
    """The measured change of the mean calibration loss between the passes against the sum of
    ``path_estimate`` over every candidate and rank (a collective)."""
    if record.losses is None or record.reduction_factor is None:
        raise ValueError("this record has no pass losses (built by hand?): use the record probe() returns")
    local = sum((float(path_estimate(layer, record.reduction_factor).double().sum())
                 for layer in record.layers.values()), 0.0)
    predicted = float(backend.sum_over_shards(torch.tensor([local], dtype=torch.float64)))
    return {"measured": record.losses[1] - record.losses[0], "predicted": predicted}
