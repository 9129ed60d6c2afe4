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

    python -m bench.quality [--smoke] [--out bench/results] [--subjects lm digits]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.lib import methods, subjects  # noqa: E402
from bench.lib.compare import actual_sparsity, at_sparsity, follows_pattern  # noqa: E402
from bench.lib.plots import plot_quality  # noqa: E402
from bench.lib.methods import GRADPROBE  # noqa: E402
from bench.lib.quality_tables import REDUCTION_FACTOR, SWEEP_BASELINES, markdown, summarize  # noqa: E402
from bench.lib.report import run_meta, write_report  # noqa: E402
from gradprobe_dist import Allocation, GradProbe  # noqa: E402
from gradprobe_dist.probe.params import find_prunable  # noqa: E402
from gradprobe_dist.runtime.log import get_logger  # noqa: E402
from gradprobe_dist.strategies.base import parse_pattern  # noqa: E402

torch.set_num_threads(1)
log = get_logger("gradprobe_dist.bench.quality")



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
    lm_eval_windows: int = 64  # evenly spaced over the validation split
    digits_calibration_samples: int = 128
    digits_micro_batch: int = 16


SMOKE = Settings(sparsities=(0.3, 0.5), thresholds=(0.0, 1.0), seeds=(0, 1), oversamples=(1.5,),
                 lm_calibration_windows=8, lm_micro_batch=4, lm_eval_windows=8, digits_calibration_samples=32)


def make_subject(name: str, settings: Settings, spec: subjects.LMSpec, cache: Path) -> subjects.Subject:
    if name == "lm":
        return subjects.lm(spec, cache, settings.lm_calibration_windows, settings.lm_micro_batch,
                           settings.lm_eval_windows)
    return subjects.digits(settings.digits_calibration_samples, settings.digits_micro_batch)


@dataclass(frozen=True)
class Method:
    """One row of the at-target tables: how a model is pruned to the target."""

    base: str  # a key of methods.NAMES
    reconstruct: bool = False  # OBS update of the kept weights, H of the dense model
    oversample: float | None = None  # candidates = oversample x target (GradProbe target mode)
    allocation: str | None = None  # per-layer sparsity: "owl" or "gradient"

    @property
    def label(self) -> str:
        if self.base == "random_candidates":
            return f"random among magnitude ×{self.oversample:g} candidates"
        text = methods.NAMES[self.base]
        text += f" target ×{self.oversample:g}" if self.oversample else ""
        text += f", {self.allocation} allocation" if self.allocation else ""
        return text + (" + reconstruction" if self.reconstruct else "")


def baseline_methods(settings: Settings, target: float, pattern: str | None) -> list[Method]:
    rows = [] if pattern else [Method("random")]  # no random N:M selection in the library
    rows += [Method("magnitude"), Method("wanda"), Method("sparsegpt"), Method("sparsegpt_dense_h"),
             Method("magnitude", reconstruct=True), Method("wanda", reconstruct=True)]
    rows += [Method("random_candidates", oversample=o) for o in settings.oversamples]
    if pattern is None and target == settings.allocation_target and "owl" in settings.allocations:
        rows += [Method("magnitude", allocation="owl"), Method("wanda", allocation="owl")]
    return rows


def gradprobe_methods(settings: Settings, target: float, pattern: str | None) -> list[Method]:
    """One probe each, decided without and then with reconstruction."""
    rows = [Method(g, oversample=o) for g in GRADPROBE for o in settings.oversamples]
    if pattern is None and target == settings.allocation_target:
        rows += [Method(g, oversample=settings.oversamples[0], allocation=a)
                 for a in settings.allocations for g in GRADPROBE]
    return rows


# -- one seed of one target -------------------------------------------------------------------
def run_at_target(subject: subjects.Subject, settings: Settings, calibration: methods.Calibration,
                  target: float, pattern: str | None = None) -> list[dict]:
    """Every method pruned to exactly ``target`` (or ``pattern``) for one calibration seed."""
    names = list(find_prunable(subject.model))
    runs = []

    def record(method: Method, model: nn.Module, **extra) -> None:
        actual, layers = actual_sparsity(model, names)
        run = {"section": "target", "target": target, "pattern": pattern, "seed": calibration.seed,
               "method": method.base, "label": method.label, "reconstruct": method.reconstruct,
               "oversample": method.oversample, "allocation": method.allocation, "requested": target,
               "sparsity": actual, "metric": subject.measure(model), "matched_to": None, **extra}
        if method.oversample or method.allocation:
            run["layers"] = layers
        if pattern:
            run["pattern_valid"] = follows_pattern(model, names, pattern)
        runs.append(run)

    for method in baseline_methods(settings, target, pattern):
        model = copy.deepcopy(subject.model)
        methods.prune(method.base, model, target, calibration, pattern, reconstruct=method.reconstruct,
                      allocation=method.allocation, oversample=method.oversample)
        record(method, model)
    for method in gradprobe_methods(settings, target, pattern):
        model = copy.deepcopy(subject.model)
        pruner = GradProbe(model, methods.make_strategy(method.base, pattern))
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


def run_sweep(subject: subjects.Subject, settings: Settings, calibration: methods.Calibration,
              target: float) -> list[dict]:
    """Threshold mode: one probe per strategy, every threshold decided from it, and every
    baseline re-run at each point's actual sparsity."""
    names = list(find_prunable(subject.model))
    seed, runs = calibration.seed, []

    def baseline(base: str):
        def pruned(sparsity: float) -> nn.Module:
            model = copy.deepcopy(subject.model)
            methods.prune(base, model, sparsity, calibration)
            return model
        return pruned

    for variant in GRADPROBE:
        model, points = copy.deepcopy(subject.model), []

        def eval_fn(pruned: nn.Module) -> float:
            actual, layers = actual_sparsity(pruned, names)
            points.append({"sparsity": actual, "layers": layers, "metric": subject.measure(pruned)})
            return points[-1]["metric"]

        start = time.perf_counter()
        GradProbe(model, methods.make_strategy(variant)).sweep_gradient_thresholds(
            calibration.batches, subject.loss_fn, eval_fn, sparsity=target, thresholds=settings.thresholds,
            num_batches=len(calibration.batches), reduction_factor=REDUCTION_FACTOR)
        log.info("%s %s threshold sweep, target %.0f%% seed %d: probe + %d evaluations in %.1f s; "
                 "sparsity %s", subject.name, variant, 100 * target, seed, len(points),
                 time.perf_counter() - start, ", ".join(f"{100 * p['sparsity']:.1f}%" for p in points))
        common = {"section": "sweep", "target": target, "pattern": None, "seed": seed}
        for threshold, point in zip(settings.thresholds, points):
            runs.append({**common, "method": variant, "threshold": threshold, "requested": target, **point,
                         "matched_to": None})
            runs += [{**common, **r} for r in at_sparsity(
                point["sparsity"], {base: baseline(base) for base in SWEEP_BASELINES}, names, subject.measure,
                matched_to={"method": variant, "threshold": threshold})]
    return runs


def run_subject(subject: subjects.Subject, settings: Settings) -> list[dict]:
    runs = []
    for seed in settings.seeds:
        calibration = methods.calibrate(subject.model, subject.calibration(seed), seed)
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
    parser.add_argument("--cache", type=Path, default=subjects.DEFAULT_CACHE, help="where the trained LM is kept")
    parser.add_argument("--subjects", nargs="+", choices=("lm", "digits"), default=["lm", "digits"])
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    out = args.out or (here / "out" / "quality-smoke" if args.smoke else here / "results")
    settings = SMOKE if args.smoke else Settings()
    spec = subjects.SMOKE_LM if args.smoke else subjects.LMSpec()

    start = time.perf_counter()
    report = {"meta": run_meta(args.smoke, settings=asdict(settings), lm_spec=asdict(spec),
                               reduction_factor=REDUCTION_FACTOR),
              "subjects": {}}
    for name in args.subjects:
        subject_start = time.perf_counter()
        subject = make_subject(name, settings, spec, args.cache)
        dense = subject.measure(subject.model)
        log.info("%s: dense %s %.4f", name, subject.metric, dense)
        runs = run_subject(subject, settings)
        report["subjects"][name] = {
            "description": subject.description, "metric": subject.metric,
            "higher_is_better": subject.higher_is_better, "dense": dense,
            "seconds": time.perf_counter() - subject_start,
            "summary": summarize(runs, asdict(settings), subject.higher_is_better), "runs": runs}
    report["meta"]["seconds"] = time.perf_counter() - start
    text = markdown(report)
    write_report(out, "quality", report, text)
    plot_quality(report, out)
    print(text)
    log.info("wrote %s in %.1f min", out, report["meta"]["seconds"] / 60)
    return report


if __name__ == "__main__":
    main()
