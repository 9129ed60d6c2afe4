"""The quality benchmark's figures, drawn from its report (``quality.json``): every method at
the target (and at N:M), per-layer allocations, and threshold mode (metric against actual
sparsity, threshold -> sparsity, per-layer sparsity)."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from bench.lib.methods import GRADPROBE
from bench.lib.quality_tables import SWEEP_BASELINES as BASELINES
from bench.lib.report import spread

COLORS = {"random": "C0", "magnitude": "C1", "wanda": "C2", "sparsegpt": "C3", "sparsegpt_dense_h": "C6",
          "random_candidates": "C7", "gradprobe_magnitude": "C4", "gradprobe_wanda": "C5"}


def plot_quality(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, sub in report["subjects"].items():
        written += [plot_target(name, sub, report["meta"]["settings"], out / f"quality_{name}_target.png"),
                    plot_allocation(name, sub, report["meta"]["settings"], out / f"quality_{name}_allocation.png"),
                    *plot_sweep(name, sub, report["meta"]["settings"], out)]
    return written


def plot_target(name: str, sub: dict, settings: dict, path: Path) -> Path:
    """Left: unstructured targets (no random, no allocation); right: the N:M rows. Perplexity
    on a log axis: the ×2 rows sit far above the others."""
    import matplotlib.pyplot as plt

    rows, metric = sub["summary"]["at_target"], sub["metric"]
    scale = "log" if metric == "perplexity" else "linear"
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    unstructured = [r for r in rows if r["pattern"] is None and r["method"] != "random" and not r["allocation"]]
    for label in dict.fromkeys(r["label"] for r in unstructured):
        line = sorted((r for r in unstructured if r["label"] == label), key=lambda r: r["target"])
        first = line[0]
        left.errorbar([100 * r["target"] for r in line], [r["metric"]["mean"] for r in line],
                      yerr=[r["metric"]["std"] for r in line], capsize=2, label=label, color=COLORS[first["method"]],
                      linestyle="--" if first["reconstruct"] else "-",
                      marker={None: "o", settings["oversamples"][0]: "s"}.get(first["oversample"], "^"))
    left.axhline(sub["dense"], color="k", linestyle=":", linewidth=1, label="dense")
    left.set(xlabel="target sparsity = actual sparsity (%)", ylabel=metric, yscale=scale,
             title=f"{name}: every method at the target (mean ± std over seeds; dashed: + reconstruction)")
    left.title.set_fontsize(9)
    left.legend(fontsize=6, ncol=2)
    nm = [r for r in rows if r["pattern"]]
    for i, r in enumerate(nm):
        right.errorbar(r["metric"]["mean"], i, xerr=r["metric"]["std"], fmt="o", capsize=3,
                       color=COLORS[r["method"]], mfc="none" if r["reconstruct"] else COLORS[r["method"]])
    right.set_yticks(range(len(nm)), [f"{r['label']} ({r['pattern']})" for r in nm], fontsize=7)
    right.invert_yaxis()
    right.axvline(sub["dense"], color="k", linestyle=":", linewidth=1)
    right.grid(axis="x", linewidth=0.3)
    right.set(xlabel=f"{metric} (dotted: dense; hollow: + reconstruction)", xscale=scale, title="semi-structured")
    return _save(fig, path)


def plot_allocation(name: str, sub: dict, settings: dict, path: Path) -> Path:
    """Per-layer actual sparsity of every allocated row (first seed, without reconstruction)."""
    import matplotlib.pyplot as plt

    seed = settings["seeds"][0]
    runs = [r for r in sub["runs"] if r["section"] == "target" and r["allocation"] and not r["reconstruct"]
            and r["seed"] == seed]
    layers = list(runs[0]["layers"]) if runs else []
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(layers) + 2) + 4, 4.5))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        ax.bar([j + (i - (len(runs) - 1) / 2) * width for j in range(len(layers))],
               [100 * run["layers"][n] for n in layers], width=width, label=run["label"])
    ax.axhline(100 * settings["allocation_target"], color="k", linestyle="--", linewidth=1, label="target")
    ax.set_xticks(range(len(layers)), [n.removesuffix(".weight").replace("transformer.", "") for n in layers],
                  rotation=90, fontsize=6)
    ax.set(ylabel="actual sparsity (%)", title=f"{name}: per-layer allocations "
                                                f"(target {100 * settings['allocation_target']:.0f}%, seed {seed})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_sweep(name: str, sub: dict, settings: dict, out: Path) -> list[Path]:
    """Threshold mode: metric against actual sparsity, threshold -> sparsity, per-layer sparsity."""
    import matplotlib.pyplot as plt

    metric = sub["metric"]
    runs = [r for r in sub["runs"] if r["section"] == "sweep" or (
        r["method"] in BASELINES and r["pattern"] is None and not r["reconstruct"] and not r["allocation"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, methods in zip(axes, ((*BASELINES, *GRADPROBE), (*BASELINES[1:], *GRADPROBE))):
        for method in methods:
            groups = defaultdict(list)
            for r in runs:
                if r["method"] == method:
                    groups[(r["target"], r.get("threshold"), json.dumps(r["matched_to"]))].append(r)
            points = sorted(((statistics.fmean(r["sparsity"] for r in g), spread([r["metric"] for r in g]))
                             for g in groups.values()), key=lambda point: point[0])
            ax.errorbar([100 * p[0] for p in points], [p[1]["mean"] for p in points],
                        yerr=[p[1]["std"] for p in points], fmt="o" if method in GRADPROBE else ".-",
                        capsize=2, label=method, color=COLORS[method])
        ax.axhline(sub["dense"], color="k", linestyle="--", linewidth=1, label="dense")
        ax.set(xlabel="actual sparsity of the prunable weights (%)", ylabel=metric)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log" if metric == "perplexity" else "linear")
    axes[0].set_title(f"{name}, threshold mode: {metric} against actual sparsity (mean ± std)", fontsize=10)
    axes[1].set_title("the same without random", fontsize=10)
    written = [_save(fig, out / f"quality_{name}_metric.png")]

    sweep = [r for r in runs if r["section"] == "sweep" and r["method"] in GRADPROBE]
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in GRADPROBE:
        for target in settings["sparsities"]:
            stats = [spread([r["sparsity"] for r in sweep if r["method"] == variant and r["target"] == target
                             and r["threshold"] == t]) for t in settings["thresholds"]]
            ax.errorbar(settings["thresholds"], [100 * s["mean"] for s in stats],
                        yerr=[100 * s["std"] for s in stats], marker="o", capsize=2,
                        linestyle="-" if variant.endswith("magnitude") else "--",
                        label=f"{variant.removeprefix('gradprobe_')}, target {100 * target:.0f}%")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="gradient_threshold", ylabel="actual sparsity (%)", title=f"{name}: threshold -> sparsity")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / f"quality_{name}_thresholds.png"))

    target, threshold, seed = settings["sparsities"][len(settings["sparsities"]) // 2], \
        settings["thresholds"][0], settings["seeds"][0]
    chosen = {v: next(r for r in sweep if r["method"] == v and r["target"] == target
                      and r["threshold"] == threshold and r["seed"] == seed) for v in GRADPROBE}
    layers = list(chosen["gradprobe_magnitude"]["layers"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 4.5))
    for offset, (variant, run) in zip((-0.2, 0.2), chosen.items()):
        ax.bar([i + offset for i in range(len(layers))], [100 * run["layers"][n] for n in layers], width=0.4,
               label=variant.removeprefix("gradprobe_"))
    ax.axhline(100 * target, color="k", linestyle="--", linewidth=1, label="target (tentative)")
    ax.set_xticks(range(len(layers)), [n.removesuffix(".weight").replace("transformer.", "") for n in layers],
                  rotation=90, fontsize=6)
    ax.set(ylabel="sparsity (%)", title=f"{name}: threshold mode per-layer sparsity "
                                        f"(target {100 * target:.0f}%, threshold {threshold:g}, seed {seed})")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / f"quality_{name}_layers.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
