"""Quality on a real LLM: SmolLM2-135M pruned by every method at the same actual sparsity.

Model: SmolLM2-135M-Instruct, converted by the project's own ``gradprobe fetch-model
smollm2-135m`` (once, into ``--model-dir``). Calibration: seeded random windows of the bundled
training excerpt; perplexity: back-to-back windows of the bundled validation excerpt
(Hamlet's first act), tokenized with the model's tokenizer. Rows per target (50%, 2:4;
30%/60% as options): dense, magnitude (per layer), Wanda (per row), SparseGPT (one shot from
the dense model's Hessians, as GradProbe's ``mode="sparsegpt"`` sees them), GradProbe target
mode over Wanda (Wanda's order, the probe vetoing ``--veto`` of the candidates, calibration-loss
guard), GradProbe ``mode="sparsegpt"`` with the probe's veto and the guard (the shipped
configs' settings, here in one shot over all layers, not in stages), and GradProbe threshold mode
(unstructured targets only), which stops short of the target, so Wanda and SparseGPT are run
again at its actual sparsity; as an option (``--methods ... iterative``, unstructured only),
``iterative_prune``'s target mode over Wanda in ``--rounds`` cubic rounds, each in Wanda's
order with the probe vetoing ``--veto`` of the candidates (guarded as the other GradProbe rows
unless ``--no-guard``). Every row of a group has the same actual sparsity (asserted).

    python -m bench.quality_llm [--smoke] [--targets 0.5 2:4] [--seeds 0] [--out bench/results]
    python -m bench.quality_llm --merge RUN_DIR [RUN_DIR ...] [--out bench/results]

``--merge`` joins the reports of several runs (targets, seeds or methods run as separate
processes) into one: every row, a summary table of mean ± std over seeds per target and
method, and the plot ``quality_llm.png``.

``--smoke`` runs a tiny random LLaMA on byte ids (seconds; what the tests run).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.lib import methods  # noqa: E402
from bench.lib.compare import actual_sparsity, follows_pattern, sparsity_gap  # noqa: E402
from bench.lib.corpus import consecutive_windows, lm_batches, random_windows  # noqa: E402
from bench.lib.report import markdown_table, run_meta, spread, write_report  # noqa: E402
from gradprobe_dist.data.shards import bundled_text_path  # noqa: E402
from gradprobe_dist.parallel.local import LocalBackend  # noqa: E402
from gradprobe_dist.pipeline.evaluate import evaluate  # noqa: E402
from gradprobe_dist.pipeline.iterative import iterative_prune  # noqa: E402
from gradprobe_dist.probe.gradprobe import GradProbe  # noqa: E402
from gradprobe_dist.probe.params import find_prunable  # noqa: E402
from gradprobe_dist.strategies import WandaPruning  # noqa: E402
from gradprobe_dist.strategies.base import parse_pattern  # noqa: E402

log = logging.getLogger("bench.quality_llm")
HERE = Path(__file__).parent


def load_model(smoke: bool, model_dir: Path) -> tuple[nn.Module, object]:
    """The model and a tokenizer (None: byte ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if smoke:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        return LlamaForCausalLM(config).eval(), None
    subprocess.run([sys.executable, "-m", "gradprobe_dist.cli", "fetch-model", "smollm2-135m",
                    "--out", str(model_dir)], check=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def token_ids(split: str, tokenizer) -> torch.Tensor:
    text = bundled_text_path(split).read_text()
    if tokenizer is None:
        return torch.tensor(list(text.encode()), dtype=torch.int64)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def perplexity(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return evaluate(model, batches, LocalBackend("cpu"))["perplexity"]


def gradprobe(model: nn.Module, batches: list, target: float, pattern: str | None, args, **options) -> GradProbe:
    probe = GradProbe(model, WandaPruning(pattern=pattern))
    probe.prune(batches, None, target, len(batches), reduction_factor=args.reduction_factor, **options)
    return probe


def guard_label(args) -> str:
    if not args.guard:
        return "no guard"
    return f"guard on {args.guard_batches} held-out batches" if args.guard_batches else "guard"


def probe_label(args) -> str:
    """How a GradProbe row was probed and decided, for its method name."""
    return f"veto {args.veto:g}, oversample {args.oversample:g}, r {args.reduction_factor:g}, {guard_label(args)}"


def run_target(dense: nn.Module, target: str, args, calibration: methods.Calibration, held_out: list,
               eval_batches: list, names: list[str]) -> list[dict]:
    """Every method at ``target`` (and threshold mode's group), one row each; ``held_out``: the
    calibration batches the guard scores on (empty: the probe's own)."""
    pattern = target if ":" in target else None
    sparsity = parse_pattern(pattern)[0] / parse_pattern(pattern)[1] if pattern else float(target)
    batches = calibration.batches
    guard = {"guard": args.guard, "guard_batches": (held_out or None) if args.guard else None}
    rows: list[dict] = []

    def record(group: str, method: str, model: nn.Module, seconds: float, **extra) -> None:
        reached = actual_sparsity(model, names)[0]
        if pattern and not method.startswith("GradProbe threshold"):
            assert follows_pattern(model, names, pattern), f"{method} does not follow {pattern}"
        rows.append({"target": target, "seed": calibration.seed, "group": group, "method": method,
                     "sparsity": reached, "perplexity": perplexity(model, eval_batches),
                     "seconds": seconds, **extra})
        log.info("%s seed %d %s: sparsity %.4f, perplexity %.2f (%.0f s)", target, calibration.seed,
                 method, reached, rows[-1]["perplexity"], seconds)

    def baseline(base: str, at: float, pat: str | None) -> tuple[nn.Module, float]:
        model, start = copy.deepcopy(dense), time.perf_counter()
        methods.prune(base, model, at, calibration, pat)
        return model, time.perf_counter() - start

    wanted = set(args.methods)
    for label, base in (("magnitude", "magnitude"), ("Wanda", "wanda"), ("SparseGPT", "sparsegpt_dense_h")):
        if base.split("_")[0] in wanted:
            record(target, label, *baseline(base, sparsity, pattern))
    if "target" in wanted:
        model, start = copy.deepcopy(dense), time.perf_counter()
        probe = gradprobe(model, batches, sparsity, pattern, args, mode="target", oversample=args.oversample,
                          veto_fraction=args.veto, **guard)
        record(target, f"GradProbe target (Wanda order, {probe_label(args)})", model,
               time.perf_counter() - start, guard=probe.guard_report)
    if "sparsegpt_veto" in wanted:
        model, start = copy.deepcopy(dense), time.perf_counter()
        probe = gradprobe(model, batches, sparsity, pattern, args, mode="sparsegpt", oversample=args.oversample,
                          veto_fraction=args.veto, **guard)
        record(target, f"GradProbe sparsegpt ({probe_label(args)})", model, time.perf_counter() - start,
               guard=probe.guard_report)
    if "iterative" in wanted and pattern is None:  # a schedule cannot ramp up an N:M pattern
        model, start = copy.deepcopy(dense), time.perf_counter()
        probe = GradProbe(model, WandaPruning())
        iterative_prune(probe, batches, target=sparsity, rounds=args.rounds, num_batches=len(batches),
                        reduction_factor=args.reduction_factor, oversample=args.oversample,
                        veto_fraction=args.veto, **guard)
        record(target, f"GradProbe iterative ({args.rounds} cubic rounds in Wanda order, {probe_label(args)})", model, time.perf_counter() - start,
               guard=probe.guard_report)
    if "threshold" in wanted and pattern is None:
        model, start = copy.deepcopy(dense), time.perf_counter()
        probe = gradprobe(model, batches, sparsity, None, args, mode="threshold", gradient_threshold=0.0, **guard)
        reached = actual_sparsity(model, names)[0]
        group = f"{target} threshold"
        record(group, f"GradProbe threshold 0 (Wanda, r {args.reduction_factor:g}, {guard_label(args)})", model,
               time.perf_counter() - start, guard=probe.guard_report)
        for label, base in (("Wanda", "wanda"), ("SparseGPT", "sparsegpt_dense_h")):
            record(group, label, *baseline(base, reached, None))
    # at a target every method prunes exact counts (per row, block or group): equal sparsity up
    # to weights already zero in the checkpoint; at threshold mode's uneven sparsity a
    # baseline's per-row count rounds down by less than one weight per row
    params = dict(dense.named_parameters())
    tolerance = 1.0 / min(params[n].shape[1] for n in names)
    for group in {r["group"] for r in rows}:
        gap = sparsity_gap([r for r in rows if r["group"] == group])
        assert gap <= tolerance, f"group {group}: actual sparsities differ by {gap:.5f} > {tolerance:.5f}"
    return rows


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# Quality on {meta['model']}", "",
             f"Calibration: {meta['calibration']}. Perplexity: {meta['evaluation']}. "
             f"Dense perplexity {report['dense']:.2f}. Lower is better; every row of a group has "
             "the same actual sparsity.", ""]
    for group in dict.fromkeys(r["group"] for r in report["rows"]):
        rows = [r for r in report["rows"] if r["group"] == group]
        lines += [f"## {group}", "", markdown_table(rows, [("method", "method", "s"), ("seed", "seed", "d"),
                                                          ("sparsity", "actual sparsity", ".4f"),
                                                          ("perplexity", "perplexity", ".2f"),
                                                          ("seconds", "seconds", ".0f")]), ""]
        guards = [r for r in rows if r.get("guard")]
        for r in guards:
            lines.append(f"Guard (seed {r['seed']}): {json.dumps(r['guard'])}")
        lines += [""] if guards else []
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    """Mean ± std of perplexity over seeds, per group and method (the order first seen)."""
    keys = sorted(dict.fromkeys((r["group"], r["method"]) for r in rows),  # N:M after the sparsities
                  key=lambda key: (":" in key[0], key[0]))
    out = []
    for group, method in keys:
        same = [r for r in rows if (r["group"], r["method"]) == (group, method)]
        out.append({"group": group, "method": method, "seeds": len(same),
                    "sparsity": statistics.fmean(r["sparsity"] for r in same),
                    **{f"perplexity_{k}": v for k, v in spread([r["perplexity"] for r in same]).items()}})
    return out


def merge(directories: list[Path], out: Path) -> dict:
    """One report from several runs' ``quality_llm.json`` (same model and evaluation)."""
    reports = [json.loads(min(d.glob("quality_llm*.json")).read_text()) for d in directories]
    denses = {round(r["dense"], 6) for r in reports}
    if len(denses) != 1:
        raise SystemExit(f"the runs were evaluated differently (dense perplexities {sorted(denses)}): "
                         "merge only runs of one model and evaluation setting")
    rows = [row for r in reports for row in r["rows"]]
    report = {"meta": run_meta(False, merged=[str(d) for d in directories], runs=[r["meta"] for r in reports]),
              "dense": reports[0]["dense"], "rows": rows, "summary": summary(rows)}
    write_report(out, "quality_llm", report, markdown_summary(report) + "\n\n" + markdown(
        {**report, "meta": reports[0]["meta"]}))
    plot(report, out / "quality_llm.png")
    return report


def markdown_summary(report: dict) -> str:
    return "# Summary: perplexity, mean ± std over calibration seeds\n\n" + markdown_table(
        [{**r, "ppl": f"{r['perplexity_mean']:.2f} ± {r['perplexity_std']:.2f}"} for r in report["summary"]],
        [("group", "target", "s"), ("method", "method", "s"), ("seeds", "seeds", "d"),
         ("sparsity", "actual sparsity", ".4f"), ("ppl", "perplexity", "s")])


def plot(report: dict, path: Path) -> None:
    """Perplexity (log) per method at each unstructured target, and at N:M, dense dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["summary"] if " " not in r["group"]]  # threshold groups aside
    targets = sorted({r["group"] for r in rows}, key=lambda g: (":" in g, g))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        at = {r["group"]: r for r in rows if r["method"] == method}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, t in enumerate(targets) if t in at]
        ax.bar(xs, [at[t]["perplexity_mean"] for t in targets if t in at], width=width, label=method,
               yerr=[at[t]["perplexity_std"] for t in targets if t in at], capsize=2)
    ax.axhline(report["dense"], color="k", linestyle=":", linewidth=1, label="dense")
    ax.set_xticks(range(len(targets)), targets)
    ax.set(yscale="log", xlabel="target (every bar of a group within one weight per row of it)",
           ylabel="perplexity (lower is better)", title="SmolLM2-135M: every method at the same sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny random LLaMA on byte ids (seconds)")
    parser.add_argument("--targets", nargs="+", default=["0.5", "2:4"], help="sparsities and/or N:M, e.g. 0.3 0.5 0.6 2:4")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds, e.g. 0 1 2")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "target", "sparsegpt_veto", "threshold"],
                        choices=["magnitude", "wanda", "sparsegpt", "target", "sparsegpt_veto", "threshold", "iterative"])
    parser.add_argument("--rounds", type=int, default=3, help="iterative mode's rounds (method iterative)")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128, help="tokens per calibration window")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--eval-context", type=int, default=256)
    parser.add_argument("--veto", type=float, default=0.1, help="share of each layer's candidates the probe vetoes")
    parser.add_argument("--oversample", type=float, default=1.5)
    parser.add_argument("--reduction-factor", type=float, default=0.1, help="the probe's scale of its candidates")
    parser.add_argument("--no-guard", dest="guard", action="store_false",
                        help="keep the probe's vetoed masks even when their calibration loss is higher")
    parser.add_argument("--guard-batches", type=int, default=4,
                        help="calibration batches (windows of the training excerpt after the probe's) the "
                             "guard scores on; 0: the probe's own batches")
    parser.add_argument("--model-dir", type=Path, default=HERE / ".cache" / "smollm2-135m")
    parser.add_argument("--out", type=Path, help="default bench/results (bench/out/quality-llm-smoke with --smoke)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="RUN_DIR", help="join these runs' reports")
    args = parser.parse_args(argv)
    if args.merge:
        report = merge(args.merge, args.out or HERE / "results")
        print(markdown_summary(report))
        return report
    if args.smoke:
        args.batches, args.micro_batch, args.context, args.eval_windows, args.eval_context = 2, 2, 16, 4, 32
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out or (HERE / "out" / "quality-llm-smoke" if args.smoke else HERE / "results")
    start = time.perf_counter()
    dense, tokenizer = load_model(args.smoke, args.model_dir)
    names = list(find_prunable(dense))
    train, valid = token_ids("train", tokenizer), token_ids("valid", tokenizer)
    eval_batches = lm_batches(consecutive_windows(valid, args.eval_windows, args.eval_context), 4)
    report = {"meta": run_meta(args.smoke, model="a tiny random LLaMA (smoke)" if args.smoke else "SmolLM2-135M-Instruct",
                               calibration=f"{args.batches} batches of {args.micro_batch} x {args.context} tokens "
                                           "of the bundled training excerpt (the guard scores "
                                           + (f"{args.guard_batches} held-out batches)" if args.guard_batches
                                              else "the probe's own)"),
                               evaluation=f"{args.eval_windows} windows of {args.eval_context} tokens of the "
                                          "bundled validation excerpt (Hamlet)",
                               prunable_weights=sum(p.numel() for n, p in dense.named_parameters() if n in names),
                               settings=vars(args) | {"model_dir": str(args.model_dir), "out": str(out)}),
              "dense": perplexity(dense, eval_batches), "rows": []}
    log.info("dense perplexity %.2f", report["dense"])
    for seed in args.seeds:
        # the probe's windows are the first of the seed's (a prefix: unchanged by --guard-batches)
        windows = random_windows(train, (args.batches + args.guard_batches) * args.micro_batch, args.context, seed)
        probe_windows = args.batches * args.micro_batch
        calibration = methods.calibrate(dense, lm_batches(windows[:probe_windows], args.micro_batch), seed)
        held_out = lm_batches(windows[probe_windows:], args.micro_batch)
        for target in args.targets:
            report["rows"] += run_target(dense, target, args, calibration, held_out, eval_batches, names)
            report["meta"]["seconds"] = time.perf_counter() - start
            write_report(out, "quality_llm-smoke" if args.smoke else "quality_llm", report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
