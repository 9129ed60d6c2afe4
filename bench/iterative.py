"""Iterative rounds vs one-shot GradProbe on the quality benchmark's subjects (issue 6's row).

    python bench/iterative.py [--smoke] [--out bench/results]

Same subjects, calibration samples and seeds as ``bench/quality.py``: GradProbe+magnitude in
target mode (oversample 1.5) one-shot, and in 3 cubic rounds (``iterative_prune``), next to
plain magnitude at the same exact sparsity. Writes iterative.json and iterative.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality import SMOKE, REDUCTION_FACTOR, Settings, digits, lm, measure  # noqa: E402
from train_subject import DEFAULT_CACHE, SMOKE_LM, LMSpec  # noqa: E402

from gradprobe_dist import GradProbe, MagnitudePruning, iterative_prune  # noqa: E402

ROUNDS = 3


def run(subject, settings: Settings, target: float, seed: int) -> dict[str, float]:
    batches = subject.calibration(seed)
    results = {}
    model = copy.deepcopy(subject.model)  # plain magnitude at the exact target
    masks = MagnitudePruning().select_weights_to_prune(model, target)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask, 0)
    results["magnitude"] = measure(subject, model)
    model = copy.deepcopy(subject.model)
    GradProbe(model, MagnitudePruning()).prune(batches, subject.loss_fn, target, len(batches),
                                               REDUCTION_FACTOR, mode="target", oversample=1.5)
    results["GradProbe one-shot"] = measure(subject, model)
    model = copy.deepcopy(subject.model)
    iterative_prune(GradProbe(model, MagnitudePruning()), batches, subject.loss_fn, target=target,
                    rounds=ROUNDS, schedule="cubic", num_batches=len(batches),
                    reduction_factor=REDUCTION_FACTOR, mode="target", oversample=1.5)
    results[f"GradProbe {ROUNDS} cubic rounds"] = measure(subject, model)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    out = args.out or (here / "out" / "iterative-smoke" if args.smoke else here / "results")
    out.mkdir(parents=True, exist_ok=True)
    settings, spec = (SMOKE, SMOKE_LM) if args.smoke else (Settings(), LMSpec())
    start = time.perf_counter()
    report = {"command": " ".join(["python bench/iterative.py", *(argv if argv is not None else sys.argv[1:])]),
              "rounds": ROUNDS, "oversample": 1.5, "subjects": {}}
    lines = ["# Iterative rounds vs one-shot (GradProbe+magnitude, target mode, oversample 1.5)", ""]
    for subject in (lm(settings, spec, DEFAULT_CACHE), digits(settings)):
        rows = {}
        for target in settings.sparsities:
            per_seed = [run(subject, settings, target, seed) for seed in settings.seeds]
            rows[target] = {m: {"mean": statistics.mean(r[m] for r in per_seed),
                                "std": statistics.stdev(r[m] for r in per_seed) if len(per_seed) > 1 else 0.0}
                            for m in per_seed[0]}
        report["subjects"][subject.name] = {"metric": subject.metric, "dense": measure(subject, subject.model),
                                            "rows": {str(t): r for t, r in rows.items()}}
        methods = list(next(iter(rows.values())))
        lines += [f"## {subject.name}: {subject.metric} (dense {report['subjects'][subject.name]['dense']:.4g})", "",
                  "| target | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        lines += [f"| {100 * t:.0f}% | " + " | ".join(f"{r[m]['mean']:.4g} ± {r[m]['std']:.2g}" for m in methods)
                  + " |" for t, r in rows.items()]
        lines.append("")
    report["seconds"] = time.perf_counter() - start
    lines.append(f"`{report['command']}`, {len(settings.seeds)} calibration seeds, mean ± std; "
                 f"{report['seconds']:.0f} s.")
    (out / "iterative.json").write_text(json.dumps(report, indent=2))
    (out / "iterative.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
