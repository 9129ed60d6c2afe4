"""Quality benchmark: does gradient probing keep models better than the usual one-shot pruners?

For each subject (a byte-level GPT-Neo LM on Shakespeare; an MLP on scikit-learn digits) and
each calibration seed, two comparisons:

* **At the target** (every method exact): random, magnitude (per layer), Wanda (per row) and
  SparseGPT (block after block, as the reference) at each target sparsity and at 2:4, against
  GradProbe + magnitude / Wanda in target mode (``oversample`` x the target probed, the lowest
  gradient ratios new/old pruned). Each GradProbe mask is also decided with
  ``reconstruct=True`` (SparseGPT's OBS update of the kept weights, H of the dense model).
  Controls for that: magnitude and Wanda masks with the same update and the same H, and
  SparseGPT run from that H; for the ranking by gradient ratio: a random pick among the same
  magnitude candidates. At ``allocation_target``, per-layer allocations (OWL, and the
  probe's own gradient redundancy), with magnitude / Wanda + OWL as controls.
* **Threshold mode** (the original): one probe per target, every threshold of the sweep
  decided from it (``GradProbe.sweep_gradient_thresholds``); GradProbe prunes only part of
  what it selects, so every baseline is run again at GradProbe's actual sparsity of each
  threshold point.

Every method sees the same calibration samples of a seed. Writes quality.json (every run),
quality.md (mean ± std over seeds) and PNG plots to ``--out``.

    python bench/quality.py [--smoke] [--out bench/results] [--subjects lm digits]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from gradprobe_dist import (Allocation, GradProbe, MagnitudePruning, PruningStrategy,  # noqa: E402
                            RandomPruning, WandaPruning)
from gradprobe_dist.strategies.activations import collect_input_sq_norms  # noqa: E402
from gradprobe_dist.strategies.allocation import allocate, owl_scores  # noqa: E402
from gradprobe_dist.parallel.local import LocalBackend  # noqa: E402
from gradprobe_dist.reconstruct.apply import collect_input_hessians  # noqa: E402
from gradprobe_dist.probe.decision import lowest_in_groups  # noqa: E402
from gradprobe_dist.pipeline.evaluate import evaluate  # noqa: E402
from gradprobe_dist.runtime.log import get_logger  # noqa: E402
from gradprobe_dist.probe.params import find_prunable  # noqa: E402
from gradprobe_dist.reconstruct.obs import accumulate_hessian, reconstruct_with_mask  # noqa: E402
from gradprobe_dist.reconstruct.sparsegpt import sparsegpt_prune  # noqa: E402
from gradprobe_dist.strategies import SelectionContext  # noqa: E402
from gradprobe_dist.strategies.base import count_to_select, parse_pattern  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_subject import (DEFAULT_CACHE, SMOKE_LM, LMSpec, digits_data, digits_subject,  # noqa: E402
                           lm_subject, random_windows, shakespeare_bytes, subject_dir)

torch.set_num_threads(1)
log = get_logger("gradprobe_dist.bench.quality")

BASELINES = ("random", "magnitude", "wanda", "sparsegpt")  # what the threshold sweep is matched with
GRADPROBE = ("gradprobe_magnitude", "gradprobe_wanda")
NAMES = {"random": "random", "magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
         "sparsegpt_dense_h": "SparseGPT, dense-model H", "random_candidates": "random among magnitude candidates",
         "gradprobe_magnitude": "GradProbe+magnitude", "gradprobe_wanda": "GradProbe+Wanda"}
REDUCTION_FACTOR = 0.1  # the library's default, in every probe of the benchmark


@dataclass(frozen=True)
class Settings:
    """What the benchmark runs (``SMOKE``: the CI-sized version, seconds)."""

    sparsities: tuple[float, ...] = (0.3, 0.5, 0.6)
    thresholds: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    oversamples: tuple[float, ...] = (1.5, 2.0)  # target mode probes oversample x target
    patterns: tuple[str, ...] = ("2:4",)
    allocations: tuple[str, ...] = ("owl", "gradient")  # with the first oversample
    allocation_target: float = 0.5
    lm_calibration_windows: int = 32  # of LMSpec.context tokens, from the training split
    lm_micro_batch: int = 4  # the probe's micro-batch: 8 batches of 4 windows
    lm_eval_windows: int = 64  # evenly spaced over hamlet + julius_caesar
    digits_calibration_samples: int = 128
    digits_micro_batch: int = 16


SMOKE = Settings(sparsities=(0.3, 0.5), thresholds=(0.0, 1.0), seeds=(0, 1), oversamples=(1.5,),
                 lm_calibration_windows=8, lm_micro_batch=4, lm_eval_windows=8, digits_calibration_samples=32)


@dataclass
class Subject:
    """A trained model, how to measure it, and its calibration batches for a seed."""

    name: str
    description: str
    model: nn.Module
    metric: str
    higher_is_better: bool
    eval_batches: list
    loss_fn: nn.Module | None
    calibration: Callable[[int], list]


def lm(settings: Settings, spec: LMSpec, cache: Path) -> Subject:
    model = lm_subject(cache, spec)
    train, valid = shakespeare_bytes("train", spec.corpus), shakespeare_bytes("valid", spec.corpus)
    starts = torch.linspace(0, valid.numel() - spec.context, settings.lm_eval_windows).long()
    windows = valid[starts.unsqueeze(1) + torch.arange(spec.context)]

    def calibration(seed: int) -> list:
        ids = random_windows(train, settings.lm_calibration_windows, spec.context, seed)
        return [{"input_ids": x, "labels": x} for x in ids.split(settings.lm_micro_batch)]

    params = sum(p.numel() for p in model.parameters())
    trained = json.loads((subject_dir(cache, spec) / "training.json").read_text())
    return Subject("lm", f"byte-level GPT-Neo, {spec.layers} layers, hidden {spec.hidden}, context "
                   f"{spec.context}, {params / 1e6:.2f} M parameters, trained {spec.steps} steps of "
                   f"{spec.batch_size} windows (final training loss {trained['final_train_loss']:.3f}); "
                   f"validation perplexity on {settings.lm_eval_windows} windows of "
                   f"{'the bundled Hamlet excerpt' if spec.corpus == 'bundled' else 'hamlet + julius_caesar'}",
                   model, "perplexity", False,
                   [{"input_ids": x, "labels": x} for x in windows.split(32)], None, calibration)


def digits(settings: Settings) -> Subject:
    data = digits_data()
    model = digits_subject(data)

    def calibration(seed: int) -> list:
        idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))
        idx = idx[:settings.digits_calibration_samples].split(settings.digits_micro_batch)
        return [(data.train_x[i], data.train_y[i]) for i in idx]

    return Subject("digits", f"SimpleMLP 64-128-64-10 on scikit-learn digits; accuracy on "
                   f"{len(data.test_y)} held-out digits", model, "accuracy", True,
                   [(data.test_x, data.test_y)], nn.CrossEntropyLoss(), calibration)


@dataclass
class Calibration:
    """One seed's calibration batches and what the dense model's forward over them gives the
    baselines: Wanda's input norms and every Linear layer's H = 2 X X^T (the same H the probe
    records for ``reconstruct=True``)."""

    seed: int
    batches: list
    input_sq_norms: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor]


def calibrate(subject: Subject, seed: int) -> Calibration:
    batches = subject.calibration(seed)
    owners = find_prunable(subject.model)
    with collect_input_sq_norms(owners) as norms, collect_input_hessians(owners) as hessians:
        forward_all(subject.model, batches)
    return Calibration(seed, batches, norms, {name: h for name, (h, _) in hessians.items()})


# -- pruning methods ------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the at-target tables: how a model is pruned to the target."""

    base: str  # a key of NAMES
    reconstruct: bool = False  # OBS update of the kept weights, H of the dense model
    oversample: float | None = None  # candidates = oversample x target (GradProbe target mode)
    allocation: str | None = None  # per-layer sparsity: "owl" or "gradient"

    @property
    def label(self) -> str:
        if self.base == "random_candidates":
            return f"random among magnitude ×{self.oversample:g} candidates"
        text = NAMES[self.base] + (f" target ×{self.oversample:g}" if self.oversample else "")
        text += f", {self.allocation} allocation" if self.allocation else ""
        return text + (" + reconstruction" if self.reconstruct else "")


def baseline_methods(settings: Settings, target: float, pattern: str | None) -> list[Method]:
    methods = [] if pattern else [Method("random")]  # no random N:M selection in the library
    methods += [Method("magnitude"), Method("wanda"), Method("sparsegpt"), Method("sparsegpt_dense_h"),
                Method("magnitude", reconstruct=True), Method("wanda", reconstruct=True)]
    methods += [Method("random_candidates", oversample=o) for o in settings.oversamples]
    if pattern is None and target == settings.allocation_target and "owl" in settings.allocations:
        methods += [Method("magnitude", allocation="owl"), Method("wanda", allocation="owl")]
    return methods


def gradprobe_methods(settings: Settings, target: float, pattern: str | None) -> list[Method]:
    """One probe each, decided without and then with reconstruction."""
    methods = [Method(g, oversample=o) for g in GRADPROBE for o in settings.oversamples]
    if pattern is None and target == settings.allocation_target:
        methods += [Method(g, oversample=settings.oversamples[0], allocation=a)
                    for a in settings.allocations for g in GRADPROBE]
    return methods


def make_strategy(base: str, pattern: str | None = None) -> PruningStrategy:
    """Magnitude (per layer) or Wanda selection, for a baseline or for GradProbe to probe."""
    if base.endswith("magnitude"):
        return MagnitudePruning("layer", pattern=pattern)
    return WandaPruning(pattern=pattern)


def forward_all(model: nn.Module, batches: list) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch[0])


def prune_baseline(method: Method, model: nn.Module, sparsity: float, calibration: Calibration,
                   pattern: str | None = None) -> None:
    """Prune ``model`` in place to ``sparsity`` of every prunable layer (N of M with ``pattern``)."""
    owners = find_prunable(model)
    n, m = parse_pattern(pattern) or (0, 0)
    params = dict(model.named_parameters())
    if method.base == "sparsegpt":
        sparsegpt_model(model, owners, calibration.batches, sparsity, n, m)
        return
    if method.base == "sparsegpt_dense_h":
        with torch.no_grad():
            for name in owners:
                params[name].copy_(sparsegpt_prune(params[name], calibration.hessians[name], sparsity,
                                                   prune_n=n, prune_m=m)[0])
        return
    context = SelectionContext.for_model(model, list(owners))
    context.input_sq_norms = calibration.input_sq_norms
    if method.allocation == "owl":
        context.layer_sparsity = owl_layer_sparsity(context, sparsity)
    if method.base == "random_candidates":
        masks = random_among_candidates(context, sparsity, method.oversample, calibration.seed, pattern)
    elif method.base == "random":
        masks = RandomPruning(seed=calibration.seed).select(context, sparsity)
    else:
        masks = make_strategy(method.base, pattern).select(context, sparsity)
    with torch.no_grad():
        for name, mask in masks.items():
            if method.reconstruct:
                params[name].copy_(reconstruct_with_mask(params[name], calibration.hessians[name], mask))
            else:
                params[name].masked_fill_(mask, 0.0)


def random_among_candidates(context: SelectionContext, sparsity: float, oversample: float, seed: int,
                            pattern: str | None) -> dict[str, torch.Tensor]:
    """The control of target mode's ranking: of magnitude's ``oversample`` x ``sparsity``
    candidates (what GradProbe+magnitude probes), prune a seeded random ``sparsity`` per
    layer (N of every M with ``pattern``) instead of the lowest gradient ratios."""
    candidates = make_strategy("magnitude", pattern).select(context, min(1.0, sparsity * oversample))
    gen = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(c.shape, generator=gen).masked_fill(~c, 2.0) for name, c in candidates.items()}
    if pattern:
        n, m = parse_pattern(pattern)
        return {name: lowest_in_groups(s.reshape(s.shape[0], -1), n, m).reshape(s.shape) for name, s in scores.items()}
    counts = {name: count_to_select(s.numel(), sparsity) for name, s in scores.items()}
    return context.select_smallest_each(scores, counts)


def owl_layer_sparsity(context: SelectionContext, sparsity: float) -> dict[str, float]:
    """OWL's per-layer sparsities from the dense model's Wanda scores, computed as the probe
    does for ``Allocation("owl")`` (the library has no public call for it without a probe)."""
    owl = Allocation("owl")
    scores = owl_scores(context.weights, context.slices, context.input_sq_norms, owl.outlier_factor,
                        context.backend, context.transposed)
    numels = {name: where.full_numel for name, where in context.slices.items()}
    return allocate(scores, numels, sparsity, owl.spread, owl.min_sparsity, owl.max_sparsity)


def sparsegpt_model(model: nn.Module, owners: dict[str, nn.Module], calibration: list,
                    sparsity: float, prune_n: int = 0, prune_m: int = 0) -> None:
    """SparseGPT block after block, as the reference does for transformer blocks.

    Layers sharing a ``prefix.<index>`` name (one transformer block, one MLP layer) are
    pruned from Hessians of the same forward, whose inputs already pass through the pruned
    earlier blocks.
    """
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in owners:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 2)
        blocks[".".join(parts[:index + 1])].append(name)
    params = dict(model.named_parameters())
    for names in blocks.values():
        hessians = {n: torch.zeros(params[n].shape[1], params[n].shape[1]) for n in names}
        seen = dict.fromkeys(names, 0)

        def hook_for(name):
            def hook(module, inputs):
                seen[name] = accumulate_hessian(hessians[name], inputs[0].detach(), seen[name])
            return hook

        handles = [owners[n].register_forward_pre_hook(hook_for(n)) for n in names]
        try:
            forward_all(model, calibration)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for n in names:
                params[n].copy_(sparsegpt_prune(params[n], hessians[n], sparsity,
                                                prune_n=prune_n, prune_m=prune_m)[0])


def layer_sparsity(model: nn.Module, names: list[str]) -> tuple[float, dict[str, float]]:
    """Fraction of exact zeros over all prunable weights, and per layer."""
    params = dict(model.named_parameters())
    zeros = {n: int((params[n] == 0).sum()) for n in names}
    total = sum(params[n].numel() for n in names)
    return sum(zeros.values()) / total, {n: zeros[n] / params[n].numel() for n in names}


def follows_pattern(model: nn.Module, names: list[str], pattern: str) -> bool:
    """True when every group of M consecutive inputs of every row holds at least N zeros
    (what semi-structured kernels need), judged from the weights themselves."""
    n, m = parse_pattern(pattern)
    params = dict(model.named_parameters())
    return all(bool(((params[name].reshape(params[name].shape[0], -1, m) == 0).sum(-1) >= n).all())
               for name in names)


def measure(subject: Subject, model: nn.Module) -> float:
    return evaluate(model, subject.eval_batches, LocalBackend("cpu"))[subject.metric]


# -- one seed of one target -------------------------------------------------------------------
def run_at_target(subject: Subject, settings: Settings, calibration: Calibration, target: float,
                  pattern: str | None = None) -> list[dict]:
    """Every method pruned to exactly ``target`` (or ``pattern``) for one calibration seed."""
    names = list(find_prunable(subject.model))
    runs = []

    def record(method: Method, model: nn.Module, **extra) -> None:
        actual, layers = layer_sparsity(model, names)
        run = {"section": "target", "target": target, "pattern": pattern, "seed": calibration.seed,
               "method": method.base, "label": method.label, "reconstruct": method.reconstruct,
               "oversample": method.oversample, "allocation": method.allocation, "requested": target,
               "sparsity": actual, "metric": measure(subject, model), "matched_to": None, **extra}
        if method.oversample or method.allocation:
            run["layers"] = layers
        if pattern:
            run["pattern_valid"] = follows_pattern(model, names, pattern)
        runs.append(run)

    for method in baseline_methods(settings, target, pattern):
        model = copy.deepcopy(subject.model)
        prune_baseline(method, model, target, calibration, pattern)
        record(method, model)
    for method in gradprobe_methods(settings, target, pattern):
        model = copy.deepcopy(subject.model)
        pruner = GradProbe(model, make_strategy(method.base, pattern))
        start = time.perf_counter()
        probed = pruner.probe(calibration.batches, subject.loss_fn, target, len(calibration.batches),
                              REDUCTION_FACTOR, oversample=method.oversample, hessians=True,
                              allocation=Allocation(method.allocation) if method.allocation else None)
        dense = {n: p.detach().clone() for n, p in model.named_parameters()}
        for reconstruct in (False, True):
            pruner.decide(probed, target, mode="target", reconstruct=reconstruct)
            record(replace(method, reconstruct=reconstruct), model, equivalent_threshold=pruner.equivalent_threshold,
                   **({"allocated": pruner.layer_sparsity} if method.allocation else {}))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(dense[n])
        log.info("%s %s %s seed %d: probe + 2 decisions in %.1f s", subject.name, method.label,
                 pattern or f"{100 * target:.0f}%", calibration.seed, time.perf_counter() - start)
    return runs


def run_sweep(subject: Subject, settings: Settings, calibration: Calibration, target: float) -> list[dict]:
    """Threshold mode: one probe per strategy, every threshold decided from it, and every
    baseline re-run at each point's actual sparsity."""
    names = list(find_prunable(subject.model))
    seed, runs = calibration.seed, []
    for variant in GRADPROBE:
        model = copy.deepcopy(subject.model)
        points = []

        def eval_fn(pruned: nn.Module) -> float:
            actual, layers = layer_sparsity(pruned, names)
            points.append({"sparsity": actual, "layers": layers, "metric": measure(subject, pruned)})
            return points[-1]["metric"]

        start = time.perf_counter()
        GradProbe(model, make_strategy(variant)).sweep_gradient_thresholds(
            calibration.batches, subject.loss_fn, eval_fn, sparsity=target, thresholds=settings.thresholds,
            num_batches=len(calibration.batches), reduction_factor=REDUCTION_FACTOR)
        log.info("%s %s threshold sweep, target %.0f%% seed %d: probe + %d evaluations in %.1f s; "
                 "sparsity %s", subject.name, variant, 100 * target, seed, len(points),
                 time.perf_counter() - start, ", ".join(f"{100 * p['sparsity']:.1f}%" for p in points))
        for threshold, point in zip(settings.thresholds, points):
            runs.append({"section": "sweep", "target": target, "pattern": None, "seed": seed, "method": variant,
                         "threshold": threshold, "requested": target, **point, "matched_to": None})
            for base in BASELINES:
                baseline = copy.deepcopy(subject.model)
                prune_baseline(Method(base), baseline, point["sparsity"], calibration)
                runs.append({"section": "sweep", "target": target, "pattern": None, "seed": seed, "method": base,
                             "requested": point["sparsity"], "sparsity": layer_sparsity(baseline, names)[0],
                             "metric": measure(subject, baseline),
                             "matched_to": {"method": variant, "threshold": threshold}})
    return runs


# -- summaries --------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


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


def summarize(runs: list[dict], settings: Settings, higher_is_better: bool) -> dict:
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
    for target in settings.sparsities:
        for variant in GRADPROBE:
            for threshold in settings.thresholds:
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
                               **{m: spread([r["metric"] for r in matched if r["method"] == m]) for m in BASELINES}},
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
             f"Command: `{meta['command']}` ({meta['seconds'] / 60:.1f} min on {meta['machine']}, "
             f"torch {meta['torch']}). Values are mean ± sample std over calibration seeds "
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
                for m in BASELINES}
        lines += ["", "### Threshold mode (the original): GradProbe and every baseline at GradProbe's actual "
                  "sparsity", "",
                  "GradProbe keeps part of what its strategy selects, so each baseline is re-run per seed at "
                  "GradProbe's own actual sparsity. Best mean of each row in bold. Baselines round their counts "
                  "down per layer (Wanda per row, SparseGPT per 128-column block) and SparseGPT also zeroes the "
                  "weights of inputs never active in calibration, so their actual sparsity differs from "
                  f"GradProbe's by at most {100 * gap:.2f} percentage points. GradProbe's mean is better than the "
                  "baseline's in " + ", ".join(f"{wins[m]}/{len(rows)} rows for {m}" for m in BASELINES) + ".", "",
                  "| target | GradProbe | threshold | actual sparsity | GradProbe | "
                  + " | ".join(BASELINES) + " |", "|---|---|---|---|---|" + "---|" * len(BASELINES)]
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


# -- plots ------------------------------------------------------------------------------------
COLORS = {"random": "C0", "magnitude": "C1", "wanda": "C2", "sparsegpt": "C3", "sparsegpt_dense_h": "C6",
          "random_candidates": "C7", "gradprobe_magnitude": "C4", "gradprobe_wanda": "C5"}


def plot(report: dict, out: Path) -> list[Path]:
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


# -- entry point ------------------------------------------------------------------------------
def run_subject(subject: Subject, settings: Settings) -> list[dict]:
    runs = []
    for seed in settings.seeds:
        calibration = calibrate(subject, seed)
        for target in settings.sparsities:
            runs += run_at_target(subject, settings, calibration, target)
            runs += run_sweep(subject, settings, calibration, target)
        for pattern in settings.patterns:
            n, m = parse_pattern(pattern)
            runs += run_at_target(subject, settings, calibration, n / m, pattern)
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny subjects and settings (CI, seconds)")
    parser.add_argument("--out", type=Path, help="default bench/results (bench/out/quality-smoke with --smoke)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the trained LM is kept")
    parser.add_argument("--subjects", nargs="+", choices=("lm", "digits"), default=["lm", "digits"])
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    out = args.out or (here / "out" / "quality-smoke" if args.smoke else here / "results")
    out.mkdir(parents=True, exist_ok=True)
    settings = SMOKE if args.smoke else Settings()
    spec = SMOKE_LM if args.smoke else LMSpec()

    start = time.perf_counter()
    report = {"meta": {"command": " ".join(["python bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
                       "smoke": args.smoke, "settings": asdict(settings), "lm_spec": asdict(spec),
                       "reduction_factor": REDUCTION_FACTOR, "torch": torch.__version__,
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"{torch.get_num_threads()} torch thread"},
              "subjects": {}}
    for name in args.subjects:
        subject_start = time.perf_counter()
        subject = lm(settings, spec, args.cache) if name == "lm" else digits(settings)
        dense = measure(subject, subject.model)
        log.info("%s: dense %s %.4f", name, subject.metric, dense)
        runs = run_subject(subject, settings)
        report["subjects"][name] = {
            "description": subject.description, "metric": subject.metric,
            "higher_is_better": subject.higher_is_better, "dense": dense,
            "seconds": time.perf_counter() - subject_start,
            "summary": summarize(runs, settings, subject.higher_is_better), "runs": runs}
    report["meta"]["seconds"] = time.perf_counter() - start
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(report))
    plot(report, out)
    print(markdown(report))
    log.info("wrote %s in %.1f min", out, report["meta"]["seconds"] / 60)
    return report


if __name__ == "__main__":
    main()
