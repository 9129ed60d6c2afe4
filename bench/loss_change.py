"""How well the probe's two passes predict loss changes, and which per-weight ranking they give
picks the weights whose removal costs least (issue #12: "a better comparison statistic").

One probe of SmolLM2-135M (Wanda's candidates at ``--sparsity`` x ``--oversample``, scaled to
``--reduction-factor``, signed gradients kept), then, all **measured**:

1. The pass check: the change of the mean calibration loss between the two passes against
   the trapezoid estimate summed over every candidate (``probe.estimate.pass_loss_check``).
2. Per sampled layer (``--layers``, evenly spaced over the model), each row's candidates
   split in half by five rankings: Wanda's score, the gradient ratio new/old (GradProbe's
   original statistic), the estimated loss change of zeroing the weight
   (``probe.estimate.removal_estimate``), abs(w) x max abs(g) (the ratio's ingredients without the
   second pass), and a seeded random order. The half each ranking would prune first is zeroed
   alone, the rest of the model dense, and the loss change is measured on calibration
   batches the probe never saw (``--held-out``); lower is a better ranking. Zeroing all of the
   layer's candidates gives a sixth point per layer for the estimate's fidelity.
3. The whole model at ``--sparsity``: Wanda's own masks, and Wanda's order with the probe
   vetoing ``--veto`` of each layer's candidates (ranked last) by the gradient ratio (target
   mode's rule) or by the estimated loss change (``probe.veto.probe_vetoes(score=...)``):
   held-out calibration loss and perplexity on the bundled validation excerpt.

    python -m bench.loss_change [--smoke] [--model-dir DIR] [--layers 12] [--out bench/results]

Prints a Markdown table and writes ``loss_change.{json,md}``. ``--smoke``: a tiny random LLaMA.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.lib.corpus import consecutive_windows, lm_batches, random_windows  # noqa: E402
from bench.lib.report import markdown_table, run_meta, write_report  # noqa: E402
from bench.quality_llm import load_model, perplexity, token_ids  # noqa: E402
from gradprobe_dist.probe.estimate import pass_loss_check, removal_estimate  # noqa: E402
from gradprobe_dist.probe.gradprobe import GradProbe  # noqa: E402
from gradprobe_dist.probe.target import in_strategy_order  # noqa: E402
from gradprobe_dist.probe.veto import probe_vetoes  # noqa: E402
from gradprobe_dist.strategies import WandaPruning  # noqa: E402

log = logging.getLogger("bench.loss_change")
HERE = Path(__file__).parent
RANKINGS = ("Wanda score", "gradient ratio", "estimated loss change", "abs(w) x max abs(g)", "random")


def mean_loss(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return statistics.fmean(float(model(**batch).loss) for batch in batches)


def lower_half_per_row(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row, the lower half of its candidates by ``scores`` (Wanda's per-row rule)."""
    per_row = candidates.sum(1)
    assert bool((per_row == per_row[0]).all()), "Wanda selects the same count in every row"
    k = int(per_row[0]) // 2
    masked = torch.where(candidates, scores.float(), torch.full_like(scores, float("inf"), dtype=torch.float32))
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, masked.topk(k, dim=1, largest=False).indices, True)
    return chosen


def rankings(wanda_scores: dict[str, torch.Tensor], record, name: str, weight: torch.Tensor,
             seed: int) -> dict[str, torch.Tensor]:
    """Every ranking's full-shape scores for layer ``name`` (lower = pruned first)."""
    layer, r = record.layers[name], record.reduction_factor

    def full(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(layer.tentative.shape).masked_scatter_(layer.tentative, values.float())

    return {"Wanda score": wanda_scores[name],
            "gradient ratio": full(layer.ratio().clamp(max=torch.finfo(torch.float32).max)),
            "estimated loss change": full(removal_estimate(layer, r)),
            "abs(w) x max abs(g)": full(layer.originals.abs() * layer.old),
            "random": torch.rand(weight.shape, generator=torch.Generator().manual_seed(seed))}


def run(args) -> dict:
    model, tokenizer = load_model(args.smoke, args.model_dir)
    train = token_ids("train", tokenizer)
    windows = random_windows(train, (args.batches + args.held_out) * args.micro_batch, args.context, args.seed)
    split = args.batches * args.micro_batch
    batches, held_out = lm_batches(windows[:split], args.micro_batch), lm_batches(windows[split:], args.micro_batch)
    probe = GradProbe(model, WandaPruning())
    start = time.perf_counter()
    record = probe.probe(batches, None, args.sparsity, args.batches, args.reduction_factor,
                         oversample=args.oversample, signed_gradients=True)
    probe_seconds = time.perf_counter() - start
    check = pass_loss_check(probe.backend, record)
    log.info("pass losses %.4f -> %.4f: measured change %.4f, trapezoid estimate %.4f (%.0f s)",
             *record.losses, check["measured"], check["predicted"], probe_seconds)
    wanda_scores = probe.target_order(record, veto=False)[0].scores  # the strategy's own order
    dense_loss = mean_loss(model, held_out)
    params = dict(model.named_parameters())
    names = list(record.layers)
    sampled = [names[round(i * (len(names) - 1) / max(args.layers - 1, 1))] for i in range(min(args.layers, len(names)))]
    rows = []
    for index, name in enumerate(sampled):
        weight = params[name]
        original = weight.detach().clone()
        candidates = record.layers[name].tentative
        estimate = torch.zeros(candidates.shape).masked_scatter_(candidates, removal_estimate(
            record.layers[name], record.reduction_factor))
        subsets = {label: lower_half_per_row(scores, candidates)
                   for label, scores in rankings(wanda_scores, record, name, original, args.seed + index).items()}
        subsets["all candidates"] = candidates
        for label, subset in subsets.items():
            with torch.no_grad():
                weight.masked_fill_(subset, 0.0)
            rows.append({"layer": name, "subset": label, "zeroed": int(subset.sum()),
                         "measured": mean_loss(model, held_out) - dense_loss,
                         "estimated": float(estimate[subset].double().sum())})
            with torch.no_grad():
                weight.copy_(original)
        log.info("%s: %s", name, ", ".join(f"{r['subset']} {r['measured']:+.4f}" for r in rows[-len(subsets):]))
    whole = whole_model(probe, record, model, args, held_out, dense_loss,
                        lm_batches(consecutive_windows(token_ids("valid", tokenizer), args.eval_windows,
                                                       args.eval_context), 4))
    return {"meta": run_meta(args.smoke, model="a tiny random LLaMA (smoke)" if args.smoke else "SmolLM2-135M-Instruct",
                             settings={k: str(v) for k, v in vars(args).items()}),
            "pass_check": check | {"losses": list(record.losses), "probe_seconds": probe_seconds},
            "dense_held_out_loss": dense_loss, "rows": rows, "summary": summary(rows), "whole_model": whole}


def whole_model(probe: GradProbe, record, model: nn.Module, args, held_out: list, dense_loss: float,
                eval_batches: list) -> list[dict]:
    """Wanda's masks at ``--sparsity`` over every layer, unvetoed and with each veto, applied
    to the model in turn: held-out calibration loss change and validation perplexity."""
    order = probe.target_order(record, veto=False)[0]
    candidates = {n: layer.tentative for n, layer in record.layers.items()}
    r = record.reduction_factor
    vetoes = {"Wanda alone": None,
              f"Wanda order, {args.veto:g} vetoed by gradient ratio": probe_vetoes(
                  probe.backend, record, fraction=args.veto),
              f"Wanda order, {args.veto:g} vetoed by estimated loss change": probe_vetoes(
                  probe.backend, record, fraction=args.veto, score=lambda layer: removal_estimate(layer, r))}
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in candidates}
    rows = [{"masks": "dense", "held_out_loss_change": 0.0, "perplexity": perplexity(model, eval_batches)}]
    for label, vetoed in vetoes.items():
        masks = in_strategy_order(probe.backend, order, candidates, vetoed, args.sparsity)
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].masked_fill_(mask, 0.0)
        rows.append({"masks": label, "held_out_loss_change": mean_loss(model, held_out) - dense_loss,
                     "perplexity": perplexity(model, eval_batches)})
        with torch.no_grad():
            for name, original in originals.items():
                params[name].copy_(original)
        log.info("%s: held-out loss %+.4f, perplexity %.2f", label, rows[-1]["held_out_loss_change"],
                 rows[-1]["perplexity"])
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per ranking: mean measured loss change of its half, how often it was the lowest of the
    rankings, and the estimate's correlation with the measurement over its subsets."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    best = {layer: min((r for r in rows if r["layer"] == layer and r["subset"] in RANKINGS),
                       key=lambda r: r["measured"])["subset"] for layer in layers}
    out = []
    for label in (*RANKINGS, "all candidates"):
        same = [r for r in rows if r["subset"] == label]
        measured, estimated = [r["measured"] for r in same], [r["estimated"] for r in same]
        out.append({"subset": label, "layers": len(same), "mean_measured": statistics.fmean(measured),
                    "lowest_in": sum(best[layer] == label for layer in layers) if label in RANKINGS else None,
                    "correlation": statistics.correlation(estimated, measured) if len(same) > 2 else None,
                    "mean_estimated": statistics.fmean(estimated)})
    return out


def markdown(report: dict) -> str:
    check = report["pass_check"]
    lines = [f"# Loss-change estimates on {report['meta']['model']}", "",
             f"Pass check: mean calibration loss {check['losses'][0]:.4f} -> {check['losses'][1]:.4f}, measured "
             f"change {check['measured']:.4f}, trapezoid estimate {check['predicted']:.4f}.", "",
             "Per sampled layer, half of each row's candidates zeroed by each ranking (held-out loss change, "
             "lower is better; `lowest in`: layers where that ranking's half cost least):", "",
             markdown_table(report["summary"], [("subset", "subset zeroed", "s"), ("layers", "layers", "d"),
                                                ("mean_measured", "mean measured loss change", ".5f"),
                                                ("mean_estimated", "mean estimated", ".5f"),
                                                ("correlation", "corr(estimated, measured) over layers", ".3f"),
                                                ("lowest_in", "lowest in", "d")]), "",
             f"The whole model at {report['meta']['settings']['sparsity']} (held-out calibration loss change; "
             "perplexity on the validation excerpt):", "",
             markdown_table(report["whole_model"], [("masks", "masks", "s"),
                                                    ("held_out_loss_change", "held-out loss change", ".4f"),
                                                    ("perplexity", "perplexity", ".2f")]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny random LLaMA on byte ids (seconds)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--oversample", type=float, default=1.5)
    parser.add_argument("--reduction-factor", type=float, default=0.1)
    parser.add_argument("--batches", type=int, default=8, help="the probe's calibration batches")
    parser.add_argument("--held-out", type=int, default=4, help="calibration batches the losses are measured on")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12, help="layers sampled for the ranking test")
    parser.add_argument("--veto", type=float, default=0.1, help="share of each layer's candidates vetoed (whole model)")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--eval-context", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, default=HERE / ".cache" / "smollm2-135m")
    parser.add_argument("--out", type=Path, help="default bench/results (bench/out/loss-change-smoke with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.held_out, args.micro_batch, args.context, args.layers = 2, 2, 2, 16, 4
        args.eval_windows, args.eval_context = 4, 32
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out or (HERE / "out" / "loss-change-smoke" if args.smoke else HERE / "results")
    start = time.perf_counter()
    report = run(args)
    report["meta"]["seconds"] = time.perf_counter() - start
    write_report(out, "loss_change-smoke" if args.smoke else "loss_change", report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
