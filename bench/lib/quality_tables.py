"""The quality benchmark's summaries and Markdown: mean ± std over seeds of every at-target
row, the headline (best row of each kind per target), and every threshold point with the
baselines re-run at its actual sparsity. Reads only the report (``bench.quality``'s JSON), so
tables can be rewritten from a committed ``quality.json``."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from bench.lib.methods import GRADPROBE, NAMES
from bench.lib.report import describe_machine, spread

SWEEP_BASELINES = ("random", "magnitude", "wanda", "sparsegpt")  # re-run at each threshold point
REDUCTION_FACTOR = 0.1  # the library's default, in every probe of the benchmark

#: headline columns: the rows each picks its best mean from
HEADLINE: dict[str, Callable[[dict], bool]] = {
    "magnitude / Wanda": lambda r: r["method"] in ("magnitude", "wanda") and not r["reconstruct"]
    and not r["allocation"],
    "GradProbe target": lambda r: r["method"] in GRADPROBE and not r["reconstruct"] and not r["allocation"],
    "magnitude / Wanda + reconstruction": lambda r: r["method"] in ("magnitude", "wanda") and r["reconstruct"],
    "GradProbe target + reconstruction": lambda r: r["method"] in GRADPROBE and r["reconstruct"]
    and not r["allocation"],
    "SparseGPT": lambda r: r["method"] == "sparsegpt",
    "SparseGPT, dense-model H": lambda r: r["method"] == "sparsegpt_dense_h",
}


def summarize(runs: list[dict], settings: dict, higher_is_better: bool) -> dict:
    """Mean/std/min/max over seeds of every at-target row, the headline (best row of each
    kind per target), and every threshold point with the baselines run at its sparsity."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r["section"] == "target":
            groups[(r["pattern"], r["target"], r["label"])].append(r)
    at_target = []
    for (pattern, target, label), rows in groups.items():
        first = rows[0]
        row = {"target": target, "pattern": pattern, "label": label,
               **{k: first[k] for k in ("method", "reconstruct", "oversample", "allocation")},
               "seeds": [r["seed"] for r in rows], "sparsity": spread([r["sparsity"] for r in rows]),
               "metric": spread([r["metric"] for r in rows])}
        if pattern:
            row["pattern_valid"] = all(r["pattern_valid"] for r in rows)
        at_target.append(row)

    best = max if higher_is_better else min
    headline = []
    for pattern, target in dict.fromkeys((r["pattern"], r["target"]) for r in at_target):
        rows = [r for r in at_target if r["pattern"] == pattern and r["target"] == target]
        headline.append({"target": target, "pattern": pattern, "best": {
            column: best((r for r in rows if pick(r)), key=lambda r: r["metric"]["mean"])
            for column, pick in HEADLINE.items()}})

    equal = []
    sweep = [r for r in runs if r["section"] == "sweep"]
    for target in settings["sparsities"]:
        for variant in GRADPROBE:
            for threshold in settings["thresholds"]:
                probe_rows = [r for r in sweep if r["target"] == target and r["method"] == variant
                              and r["threshold"] == threshold]
                key = {"method": variant, "threshold": threshold}
                matched = [r for r in sweep if r["target"] == target and r["matched_to"] == key]
                equal.append({
                    "target": target, "gradprobe": variant, "threshold": threshold,
                    "sparsity": spread([r["sparsity"] for r in probe_rows]),
                    "max_sparsity_gap": max(abs(m["sparsity"] - p["sparsity"]) for p in probe_rows
                                            for m in matched if m["seed"] == p["seed"]),
                    "metric": {variant: spread([r["metric"] for r in probe_rows]),
                               **{m: spread([r["metric"] for r in matched if r["method"] == m]) for m in SWEEP_BASELINES}},
                })
    return {"at_target": at_target, "headline": headline, "at_gradprobe_sparsity": equal}


def fmt(s: dict, metric: str) -> str:
    scale, unit = (100, "%") if metric == "accuracy" else (1, "")
    return f"{scale * s['mean']:.2f}{unit} ± {scale * s['std']:.2f}"


def target_name(target: float, pattern: str | None) -> str:
    return f"{pattern} ({100 * target:.0f}%)" if pattern else f"{100 * target:.0f}%"


def short_label(row: dict) -> str:
    return NAMES[row["method"]] + (f" ×{row['oversample']:g}" if row["oversample"] else "")


def better(ours: dict, theirs: dict, higher_is_better: bool) -> bool:
    """Strictly better mean."""
    a, b = ours["metric"]["mean"], theirs["metric"]["mean"]
    return a != b and (a > b) == higher_is_better


def verdicts(summary: dict, higher_is_better: bool) -> str:
    """How often GradProbe's best variant beats each comparison's best, and how often its
    ranking by gradient ratio beats a random pick among the same candidates (from the means)."""
    headline = summary["headline"]

    def wins(ours: str, theirs: str) -> str:
        count = sum(better(h["best"][ours], h["best"][theirs], higher_is_better) for h in headline)
        return f"{count}/{len(headline)}"

    rows = summary["at_target"]
    pairs = [(r, next(c for c in rows if c["method"] == "random_candidates" and c["oversample"] == r["oversample"]
                      and c["target"] == r["target"] and c["pattern"] == r["pattern"]))
             for r in rows if r["method"] == "gradprobe_magnitude" and not r["reconstruct"] and not r["allocation"]]
    ranking = sum(better(ours, control, higher_is_better) for ours, control in pairs)
    return (f"GradProbe+magnitude in target mode beats a random pick among the same magnitude candidates in "
            f"{ranking}/{len(pairs)} (target, oversample) cases. "
            f"GradProbe target's best mean is better than the better of magnitude / Wanda at "
            f"{wins('GradProbe target', 'magnitude / Wanda')} targets. With reconstruction, it is better than "
            f"magnitude / Wanda + reconstruction (same H) at "
            f"{wins('GradProbe target + reconstruction', 'magnitude / Wanda + reconstruction')}, than SparseGPT "
            f"from the same dense-model H at {wins('GradProbe target + reconstruction', 'SparseGPT, dense-model H')}"
            f", and than SparseGPT (sequential, the reference) at "
            f"{wins('GradProbe target + reconstruction', 'SparseGPT')} targets.")


def markdown(report: dict) -> str:
    meta, settings = report["meta"], report["meta"]["settings"]
    lines = ["# Quality benchmark: GradProbe against one-shot pruners", "",
             f"Command: `{meta['command']}` ({meta['seconds'] / 60:.1f} min on {describe_machine(meta['machine'])}"
             f"{', torch ' + meta['torch'] if 'torch' in meta else ''}). Values are mean ± sample std over calibration seeds "
             f"{list(settings['seeds'])} (min and max in quality.json); every method of a seed sees the same "
             "calibration samples. Full data: quality.json.", "",
             "Methods at the target: *magnitude* (per layer), *Wanda* (per output row), *SparseGPT* (block after "
             "block: each block's H from inputs through the already pruned blocks, as the reference). "
             "*GradProbe+X target ×o*: GradProbe probing the candidates strategy X selects at o × the target "
             "(capped at every weight), then pruning exactly the target with the lowest gradient ratio new/old "
             f"(reduction factor {REDUCTION_FACTOR:g}; for N:M, exactly N of every M). Where o × target ≥ 1 every "
             "weight is a candidate (the whole model scaled down in the probe): the magnitude and Wanda variants "
             "then coincide and the gradient ratio alone decides. *random among magnitude ×o candidates*: the "
             "same candidates as GradProbe+magnitude ×o, the target picked at random among them (the control for "
             "ranking by gradient ratio). *+ reconstruction*: the "
             "kept weights of every layer updated by SparseGPT's OBS step with the mask fixed, from H = 2XXᵀ of "
             "the dense model's inputs (what `prune(reconstruct=True)` records); *magnitude / Wanda + "
             "reconstruction* and *SparseGPT, dense-model H* use that same H, so they isolate the mask from the "
             "update. *owl allocation*: OWL's per-layer sparsities; *gradient allocation*: per layer from the "
             "share of candidates whose gradient did not grow (`Allocation('gradient')`); both with parameter-"
             "weighted mean equal to the target.", ""]
    for name, sub in report["subjects"].items():
        metric, higher = sub["metric"], sub["higher_is_better"]
        dense = sub["dense"] * (100 if metric == "accuracy" else 1)
        summary = sub["summary"]
        lines += [f"## {name}: {metric} ({'higher' if higher else 'lower'} is better)", "",
                  sub["description"] + ".", "", f"Dense: {dense:.2f}{'%' if metric == 'accuracy' else ''}.", "",
                  "### Headline: best of each kind at the same exact sparsity", "",
                  "Each cell: the best mean among the rows of that kind (GradProbe picks from "
                  f"{len(GRADPROBE) * len(settings['oversamples'])} variants, magnitude / Wanda from 2: the "
                  "selection favours GradProbe). " + verdicts(summary, higher), "",
                  "| target | " + " | ".join(HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
        for h in summary["headline"]:
            lines.append(f"| {target_name(h['target'], h['pattern'])} | " + " | ".join(
                f"{fmt(r['metric'], metric)} ({short_label(r)})" for r in h["best"].values()) + " |")
        lines += ["", "### Every method at the target sparsity", "",
                  "Best mean of each table in bold. Actual sparsity counts exact zeros over all prunable weights. "
                  "Counts are rounded down per layer, and per output row for Wanda and Wanda + reconstruction, so "
                  "those can sit slightly below the target (GradProbe+Wanda in target mode counts per layer); "
                  "SparseGPT also zeroes the weights of inputs never active in calibration, so it can exceed it."]
        for pattern, target in dict.fromkeys((r["pattern"], r["target"]) for r in summary["at_target"]):
            rows = [r for r in summary["at_target"] if r["pattern"] == pattern and r["target"] == target]
            best = (max if higher else min)(r["metric"]["mean"] for r in rows)
            lines += ["", f"#### {target_name(target, pattern)}", "",
                      f"| method | actual sparsity | {'valid ' + pattern + ' | ' if pattern else ''}{metric} |",
                      "|---|---|" + ("---|" if pattern else "") + "---|"]
            for r in rows:
                cell = fmt(r["metric"], metric)
                valid = ("yes | " if r["pattern_valid"] else "**no** | ") if pattern else ""
                lines.append(f"| {r['label']} | {fmt(r['sparsity'], 'accuracy')} | {valid}"
                             + (f"**{cell}**" if r["metric"]["mean"] == best else cell) + " |")
        rows = summary["at_gradprobe_sparsity"]
        gap = max(row["max_sparsity_gap"] for row in rows)
        sign = 1 if higher else -1
        wins = {m: sum(sign * (r["metric"][r["gradprobe"]]["mean"] - r["metric"][m]["mean"]) > 0 for r in rows)
                for m in SWEEP_BASELINES}
        lines += ["", "### Threshold mode (the original): GradProbe and every baseline at GradProbe's actual "
                  "sparsity", "",
                  "GradProbe keeps part of what its strategy selects, so each baseline is re-run per seed at "
                  "GradProbe's own actual sparsity. Best mean of each row in bold. Baselines round their counts "
                  "down per layer (Wanda per row, SparseGPT per 128-column block) and SparseGPT also zeroes the "
                  "weights of inputs never active in calibration, so their actual sparsity differs from "
                  f"GradProbe's by at most {100 * gap:.2f} percentage points. GradProbe's mean is better than the "
                  "baseline's in " + ", ".join(f"{wins[m]}/{len(rows)} rows for {m}" for m in SWEEP_BASELINES) + ".", "",
                  "| target | GradProbe | threshold | actual sparsity | GradProbe | "
                  + " | ".join(SWEEP_BASELINES) + " |", "|---|---|---|---|---|" + "---|" * len(SWEEP_BASELINES)]
        for row in rows:
            means = {m: s["mean"] for m, s in row["metric"].items()}
            best = (max if higher else min)(means.values())
            cells = [("**" + fmt(s, metric) + "**") if s["mean"] == best else fmt(s, metric)
                     for s in row["metric"].values()]
            lines.append(f"| {100 * row['target']:.0f}% | {row['gradprobe'].removeprefix('gradprobe_')} | "
                         f"{row['threshold']:g} | {fmt(row['sparsity'], 'accuracy')} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Plots: `quality_<subject>_target.png` (every method at the target, and at 2:4), "
              "`quality_<subject>_allocation.png` (per-layer sparsity of the allocations), "
              "`quality_<subject>_metric.png` (threshold mode: metric against actual sparsity), "
              "`quality_<subject>_thresholds.png` (threshold -> actual sparsity), "
              "`quality_<subject>_layers.png` (threshold mode's per-layer sparsity).", ""]
    return "\n".join(lines)
