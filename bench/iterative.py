"""Iterative rounds vs one-shot GradProbe on the quality benchmark's subjects (issue 6's row).

    python -m bench.iterative [--smoke] [--out bench/results]

Same subjects, calibration samples and seeds as ``bench.quality``: GradProbe+magnitude in
target mode (oversample 1.5) one-shot, and in 3 cubic rounds (``iterative_prune``), next to
plain magnitude at the same exact sparsity. Writes iterative.json and iterative.md.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.lib import methods, subjects
from bench.lib.report import run_meta, spread, write_report
from bench.quality import REDUCTION_FACTOR, SMOKE, Settings, make_subject
from gradprobe_dist import GradProbe, MagnitudePruning, iterative_prune

ROUNDS = 3
OVERSAMPLE = 1.5


def run(subject: subjects.Subject, target: float, seed: int) -> dict[str, float]:
    batches = subject.calibration(seed)
    probe_args = dict(num_batches=len(batches), reduction_factor=REDUCTION_FACTOR, mode="target",
                      oversample=OVERSAMPLE)
    results = {}
    model = copy.deepcopy(subject.model)  # plain magnitude at the exact target
    methods.prune("magnitude", model, target, methods.calibrate(subject.model, batches, seed))
    results["magnitude"] = subject.measure(model)
    model = copy.deepcopy(subject.model)
    GradProbe(model, MagnitudePruning()).prune(batches, subject.loss_fn, target, **probe_args)
    results["GradProbe one-shot"] = subject.measure(model)
    model = copy.deepcopy(subject.model)
    iterative_prune(GradProbe(model, MagnitudePruning()), batches, subject.loss_fn, target=target,
                    rounds=ROUNDS, schedule="cubic", **probe_args)
    results[f"GradProbe {ROUNDS} cubic rounds"] = subject.measure(model)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cache", type=Path, default=subjects.DEFAULT_CACHE, help="where the trained LM is kept")
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    out = args.out or (here / "out" / "iterative-smoke" if args.smoke else here / "results")
    settings, spec = (SMOKE, subjects.SMOKE_LM) if args.smoke else (Settings(), subjects.LMSpec())
    start = time.perf_counter()
    report = {"meta": run_meta(args.smoke, settings=asdict(settings), lm_spec=asdict(spec)),
              "rounds": ROUNDS, "oversample": OVERSAMPLE, "subjects": {}}
    lines = [f"# Iterative rounds vs one-shot (GradProbe+magnitude, target mode, oversample {OVERSAMPLE})", ""]
    for name in ("lm", "digits"):
        subject = make_subject(name, settings, spec, args.cache)
        rows = {}
        for target in settings.sparsities:
            per_seed = [run(subject, target, seed) for seed in settings.seeds]
            rows[target] = {m: spread([r[m] for r in per_seed]) for m in per_seed[0]}
        dense = subject.measure(subject.model)
        report["subjects"][name] = {"metric": subject.metric, "higher_is_better": subject.higher_is_better,
                                    "dense": dense, "rows": {str(t): r for t, r in rows.items()}}
        columns = list(next(iter(rows.values())))
        lines += [f"## {name}: {subject.metric} (dense {dense:.4g})", "",
                  "| target | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {100 * t:.0f}% | " + " | ".join(f"{r[m]['mean']:.4g} ± {r[m]['std']:.2g}" for m in columns)
                  + " |" for t, r in rows.items()]
        lines.append("")
    report["seconds"] = time.perf_counter() - start
    lines.append(f"`{report['meta']['command']}`, {len(settings.seeds)} calibration seeds, mean ± std; "
                 f"{report['seconds']:.0f} s.")
    write_report(out, "iterative", report, "\n".join(lines))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
