"""Plots of a mask checkpoint: where the sparsity went, and what the probe measured.

``plot_checkpoint(directory, out_dir)`` writes PNGs (matplotlib's ``Figure`` renders with
Agg: no pyplot, no display, no global state):

* ``sparsity.png``: pruned fraction per layer, from ``manifest.json``;
* ``ratios-NN.png``: per layer, a histogram of log10 of the gradient ratio new/old of the
  weights the probe decided about (pruned where ratio <= 1 + gradient_threshold);
* ``threshold_curve.png``: the sparsity threshold mode reaches at each gradient_threshold,
  read off the same ratios.

The last two need each layer's ratios in the checkpoint, saved by its writer as
``save_layer(..., tensors={"ratio": r})`` with ``r`` from ``ratio_tensors(record)`` gathered
to the full weight and its NaN (not selected) entries dropped. matplotlib is needed only to
draw; ``ratio_tensors`` and ``threshold_curve`` work without it.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gradprobe_dist.checkpoint.format import CARRIED_KEY, RATIO_KEY
from gradprobe_dist.checkpoint.store import MaskCheckpoint
from gradprobe_dist.probe.decision import ProbeRecord
from gradprobe_dist.probe.record import LayerProbe
from gradprobe_dist.runtime.log import get_logger
from gradprobe_dist.probe.validation import check_threshold

log = get_logger(__name__)

DEFAULT_THRESHOLDS = [i / 100 for i in range(101)]
LAYERS_PER_PAGE = 16


def ratio_tensor(layer: LayerProbe) -> torch.Tensor:
    """One weight's new/old (float32) in its local shape, NaN where it was not tentatively
    selected: gatherable with ``backend.gather_full`` under any backend."""
    ratio = layer.ratio()
    return torch.full(layer.tentative.shape, float("nan"), device=ratio.device).masked_scatter_(
        layer.tentative.to(ratio.device), ratio)


def ratio_tensors(record: ProbeRecord) -> dict[str, torch.Tensor]:
    """``ratio_tensor`` of every probed weight (all at once: four bytes per weight)."""
    return {name: ratio_tensor(layer) for name, layer in record.layers.items()}


def threshold_curve(ratios: Mapping[str, torch.Tensor], total: int, thresholds: Sequence[float],
                    carried: int = 0) -> list[float]:
    """For each t: ``(carried + #{ratio <= 1 + t}) / total``, the sparsity threshold mode
    reaches at gradient_threshold t (ratios compared in float32, as the decision does; NaN
    entries, i.e. weights not selected, are ignored)."""
    thresholds = list(thresholds)
    if not thresholds:
        raise ValueError("thresholds is empty: pass e.g. [0.0, 0.1, 0.2]")
    for t in thresholds:
        check_threshold(t)
    if total <= 0:
        raise ValueError(f"total={total} must be the (positive) number of weights the ratios come from")
    flat = [r.detach().reshape(-1).float().cpu() for r in ratios.values()]
    values = torch.cat(flat) if flat else torch.zeros(0)
    values = values[~values.isnan()].sort().values
    bounds = torch.tensor([1.0 + t for t in thresholds], dtype=torch.float32)
    counts = torch.searchsorted(values, bounds, right=True)
    return ((counts.double() + carried) / total).tolist()


def plot_checkpoint(directory: str | os.PathLike, out_dir: str | os.PathLike,
                    thresholds: Sequence[float] | None = None, allow_partial: bool = False) -> list[Path]:
    """Write the PNGs described in the module docstring into ``out_dir``, and the curve's
    numbers as ``threshold_curve.json``; returns the paths written. A partial checkpoint is
    refused unless ``allow_partial``; an empty one always."""
    ckpt = MaskCheckpoint.read(directory)
    ckpt.completed()  # every layer file checked against its sha256
    rows = ckpt.summary_rows()
    if not rows:
        raise ValueError(f"the checkpoint '{directory}' has no saved layers yet: plot it once "
                         "pruning has written at least one layer")
    if not allow_partial:
        ckpt.check_complete()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [draw_sparsity(rows, out / "sparsity.png")]
    infos = {row["name"]: ckpt.layer_info(row["name"]) for row in rows}
    ratios = {name: ckpt.load_layer_tensors(name)[RATIO_KEY] for name, info in infos.items()
              if RATIO_KEY in info["tensors"]}
    if not ratios:
        log.info("no gradient ratios in %s (its writer did not save tensors={'ratio': ...}): "
                 "only the sparsity plot", directory)
        return paths
    paths += draw_ratio_histograms(ratios, out)
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else list(thresholds)
    total = sum(infos[n]["numel"] for n in ratios)
    carried = sum(infos[n].get(CARRIED_KEY, 0) for n in ratios)  # only iterative rounds carry
    curve = threshold_curve(ratios, total, thresholds, carried)
    saved = sum(infos[n]["pruned"] for n in ratios) / total
    paths.append(draw_threshold_curve(thresholds, curve, saved, out / "threshold_curve.png"))
    numbers = {"layers": list(ratios), "thresholds": thresholds, "sparsity": curve,
               "checkpoint_sparsity": saved}
    paths.append(out / "threshold_curve.json")
    paths[-1].write_text(json.dumps(numbers, indent=2))
    return paths


# -- drawing ---------------------------------------------------------------------------------
def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib "
                          "(or pip install 'gradprobe-dist[bench]')") from None
    return Figure(figsize=(width, height), layout="constrained")


def draw_sparsity(rows: list[dict], path: Path) -> Path:
    """Horizontal bars: pruned fraction of every layer, and the overall fraction."""
    names = [row["name"] for row in rows]
    numels = [math.prod(row["shape"]) for row in rows]
    overall = sum(row["pruned"] for row in rows) / max(sum(numels), 1)
    fig = _figure(8, 1.2 + 0.28 * len(rows))
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [100 * row["sparsity"] for row in rows], color="tab:blue")
    ax.axvline(100 * overall, color="black", linestyle="--", label=f"overall {100 * overall:.1f}%")
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlim(0, 100)
    ax.set_xlabel("pruned weights (%)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)
    return path


def draw_ratio_histograms(ratios: Mapping[str, torch.Tensor], out: Path) -> list[Path]:
    """One panel per layer (``LAYERS_PER_PAGE`` per PNG): log10(new/old) of the weights the
    probe decided about; left of the red line (ratio 1) means the gradient did not grow."""
    items = list(ratios.items())
    paths = []
    for page, first in enumerate(range(0, len(items), LAYERS_PER_PAGE), start=1):
        chunk = items[first:first + LAYERS_PER_PAGE]
        cols = min(4, len(chunk))
        rows = math.ceil(len(chunk) / cols)
        fig = _figure(3.6 * cols, 2.6 * rows)
        for index, (name, ratio) in enumerate(chunk):
            ax = fig.add_subplot(rows, cols, index + 1)
            values = ratio.detach().reshape(-1).float().cpu()
            values = values[~values.isnan()]
            positive = values[(values > 0) & values.isfinite()]
            if positive.numel():
                ax.hist(positive.log10().numpy(), bins=50, color="tab:blue")
            ax.axvline(0.0, color="tab:red", linewidth=1)
            share = float((values <= 1).float().mean()) if values.numel() else 0.0
            zero, inf = int((values == 0).count_nonzero()), int(values.isinf().count_nonzero())
            ax.set_title(f"{name}\n{values.numel()} weights, {100 * share:.0f}% <= 1, "
                         f"{zero} zero, {inf} inf", fontsize=7)
            ax.set_xlabel("log10(new / old)", fontsize=7)
            ax.tick_params(labelsize=6)
        path = out / f"ratios-{page:02d}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def draw_threshold_curve(thresholds: Sequence[float], curve: Sequence[float], saved: float,
                         path: Path) -> Path:
    """Sparsity against gradient_threshold, with the checkpoint's own sparsity for reference."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(list(thresholds), [100 * v for v in curve], marker=".", markersize=3)
    ax.axhline(100 * saved, color="black", linestyle="--", label=f"checkpoint {100 * saved:.1f}%")
    ax.set_xlabel("gradient_threshold t (prune where new <= old (1 + t))")
    ax.set_ylabel("sparsity of these layers (%)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)
    return path
