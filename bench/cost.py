"""Cost benchmark: what a probe costs next to the forward+backward work it cannot avoid.

1. Probe vs its floor: a probe is two gradient passes over ``num_batches`` batches, so its
   ideal time is 2 x (forward+backward over those batches). Both are timed in one process,
   interleaved, median of repeats, with a breakdown of one probe (forward, backward,
   selection timed through public extension points; the rest is the probe's own work).
2. A sweep of 5 thresholds (one probe) vs 5 separate prunes.
3. Where probing stalls: on a ReLU MLP trained on scikit-learn digits, the sparsity reached
   at thresholds 0 / 0.1 / 1.0 against the target, and how many selected weights had an
   exactly zero gradient.
4. 1 vs 2 ranks per parallel mode (none / ddp / fsdp / zero3), on real gloo processes:
   probe wall time, share of it inside collectives, probe state and peak RSS per rank.
5. Selection time of each strategy inside a probe.

    python -m bench.cost [--smoke] [--out bench/results] [--sections probe sweep ...]

Prints the Markdown tables and writes ``cost.json`` and ``cost.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # ZeRO-3 on CPU

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.lib import subjects  # noqa: E402
from bench.lib.cost_tables import flatten_for_tables, to_markdown  # noqa: E402
from bench.lib.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss  # noqa: E402
from gradprobe_dist.runtime.memory import return_freed_memory  # noqa: E402
from bench.lib.ranks import run_ranks  # noqa: E402
from bench.lib.report import run_meta, write_report  # noqa: E402
from bench.lib.timing import Seconds, Stopwatch, TimedBackwardBackend, TimedStrategy, median, timed  # noqa: E402
from bench.lib.workloads import (MLPSpec, Workload, classifier_loss, count_prunable, gpt_workload,  # noqa: E402
                                 kept_weights, mlp_workload, text_batches)
from gradprobe_dist import GradProbe, MagnitudePruning, RandomPruning, WandaPruning  # noqa: E402
from gradprobe_dist.runtime.log import get_logger  # noqa: E402

torch.set_num_threads(1)
log = get_logger("gradprobe_dist.bench.cost")

SPARSITY = 0.5
REDUCTION = 0.1
MODES = ("none", "ddp", "fsdp", "zero3")
SECTIONS = ("probe", "sweep", "stall", "ranks", "selection")
STRATEGIES: dict[str, Callable] = {
    "magnitude (layer)": lambda: MagnitudePruning("layer"),
    "magnitude (global)": lambda: MagnitudePruning("global"),
    "wanda": WandaPruning,
    "random": RandomPruning,
}
MiB = 2**20


@dataclass(frozen=True)
class Settings:
    """Sizes of every section: ``FULL`` for the committed numbers (about 6-9 minutes on 2
    cores), ``SMOKE`` to check that the script runs (seconds; the numbers mean nothing)."""

    repeats: int = 3
    gpt: dict = field(default_factory=lambda: dict(n_layer=4, n_embd=256, n_head=4, block_size=128))
    gpt_micro_batch: int = 8
    gpt_batches: int = 8
    mlp: MLPSpec = MLPSpec(784, (512, 256), 10, micro_batch=64, num_batches=8)
    sweep_thresholds: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5)
    sweep_batches: int = 4
    eval_batches: int = 2
    digits_hidden: tuple[int, ...] = (128, 64)
    digits_steps: int = 400
    digits_batch: int = 64
    digits_calib_batches: int = 8
    stall_sparsities: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    stall_thresholds: tuple[float, ...] = (0.0, 0.1, 1.0)
    wide_mlp: MLPSpec = MLPSpec(1024, (2560,) * 4, 1024, micro_batch=8, num_batches=4)
    rank_repeats: int = 2
    rank_timeout_s: float = 600.0
    process_per_mode: bool = True  # clean peak RSS per mode; False saves launches (smoke)


FULL = Settings()
SMOKE = Settings(
    repeats=1, gpt=dict(n_layer=1, n_embd=32, n_head=2, block_size=32), gpt_micro_batch=2,
    gpt_batches=2, mlp=MLPSpec(64, (32,), 10, micro_batch=16, num_batches=2),
    sweep_batches=1, eval_batches=1, digits_hidden=(32,), digits_steps=20, digits_batch=32,
    digits_calib_batches=2, stall_sparsities=(0.5,),
    wide_mlp=MLPSpec(64, (64, 64), 16, micro_batch=4, num_batches=1), rank_repeats=1,
    rank_timeout_s=120.0, process_per_mode=False)


def probe(pruner: GradProbe, work: Workload, batches: list | None = None,
          loss_of: Callable | None = None, sparsity: float = SPARSITY):
    """``pruner.probe`` on the workload's batches (or ``batches``) with the benchmark's settings."""
    batches = work.batches if batches is None else batches
    return pruner.probe(batches, None, sparsity=sparsity, num_batches=len(batches),
                        reduction_factor=REDUCTION, compute_loss=loss_of or work.loss_of)


# -- 1. probe vs floor ----------------------------------------------------------------------
def probe_vs_floor(work: Workload, repeats: int) -> dict:
    """Interleave floor / probe / prune repeats so that machine noise hits all three alike."""
    model, batches = work.model, work.batches
    model.eval()
    pruner = GradProbe(model, MagnitudePruning("layer"))

    def floor():
        for batch in batches:
            work.loss_of(model, batch).backward()
            model.zero_grad(set_to_none=True)

    def prune():
        pruner.prune(batches, None, sparsity=SPARSITY, num_batches=len(batches),
                     reduction_factor=REDUCTION, gradient_threshold=0.0, compute_loss=work.loss_of)

    floor()  # warm-up: allocator, first-call dispatch
    probe(pruner, work, batches[:1])
    samples: dict[str, list[Seconds]] = {"floor": [], "probe": [], "prune": []}
    for _ in range(repeats):
        samples["floor"].append(timed(floor)[1])
        samples["probe"].append(timed(probe, pruner, work)[1])
        with kept_weights(model):
            samples["prune"].append(timed(prune)[1])
    floor_s, probe_s, prune_s = (median(samples[k]) for k in ("floor", "probe", "prune"))
    two_passes = floor_s.times(2)
    return {
        "workload": work.name, "prunable_weights": count_prunable(model),
        "num_batches": len(batches), "repeats": repeats,
        "fwd_bwd_per_batch_s": floor_s.wall / len(batches),
        "floor_s": asdict(two_passes), "probe_s": asdict(probe_s), "prune_s": asdict(prune_s),
        "probe_over_floor_wall": probe_s.wall / two_passes.wall, "probe_over_floor_cpu": probe_s.cpu / two_passes.cpu,
        "prune_over_floor_wall": prune_s.wall / two_passes.wall, "prune_over_floor_cpu": prune_s.cpu / two_passes.cpu,
        "target": 1.05, "meets_target_wall": probe_s.wall / two_passes.wall <= 1.05,
        "meets_target_cpu": probe_s.cpu / two_passes.cpu <= 1.05,
        "breakdown": probe_breakdown(work, two_passes),
    }


def probe_breakdown(work: Workload, floor: Seconds) -> list[dict]:
    """One probe split into phases that add up to its total: its forwards (the loss callable),
    backwards (a backend subclass) and selection (a strategy wrapper); the rest is the probe's
    own work between them."""
    forward, backend = Stopwatch(), TimedBackwardBackend(device="cpu")
    strategy = TimedStrategy(MagnitudePruning("layer"))
    pruner = GradProbe(work.model, strategy, backend=backend)
    _, total = timed(probe, pruner, work, None, forward.wrap(work.loss_of))
    phases = {"forward (loss callable)": forward.total, "backward (Backend.backward)": backend.watch.total,
              "selection (strategy.select)": strategy.watch.total}
    phases["rest of probe (statistic fold, finite checks, scale, restore, prepare)"] = \
        total - forward.total - backend.watch.total - strategy.watch.total
    rows = [{"phase": name, "wall_s": s.wall, "cpu_s": s.cpu, "share": s.wall / total.wall}
            for name, s in phases.items()]
    fwd_bwd = forward.total + backend.watch.total
    rows.append({"phase": "total (its forward+backward / floor: "
                          f"{fwd_bwd.wall / floor.wall:.3f} wall, {fwd_bwd.cpu / floor.cpu:.3f} CPU)",
                 "wall_s": total.wall, "cpu_s": total.cpu, "share": 1.0})
    return rows


# -- 2. sweep vs separate prunes --------------------------------------------------------------
def sweep_vs_separate(work: Workload, eval_batches: list, thresholds: tuple[float, ...]) -> dict:
    """One probe decides every threshold; separate prunes probe once per threshold. Both
    report the sparsity and evaluate the model at every threshold (evaluations timed apart,
    so the ratio is given with and without them); between separate prunes the weights are
    reset (not timed)."""
    model, batches = work.model, work.batches
    pruner = GradProbe(model, MagnitudePruning("layer"))
    evals = Stopwatch()

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.stack([work.loss_of(m, b) for b in eval_batches]).mean())

    probe(pruner, work, batches[:1])  # warm-up
    sweep, sweep_s = timed(pruner.sweep_gradient_thresholds, batches, None, evals.wrap(evaluate),
                           sparsity=SPARSITY, thresholds=thresholds, num_batches=len(batches),
                           reduction_factor=REDUCTION, compute_loss=work.loss_of)
    sweep_eval = evals.total

    def prune_once(threshold: float) -> float:
        pruner.prune(batches, None, sparsity=SPARSITY, num_batches=len(batches), reduction_factor=REDUCTION,
                     gradient_threshold=threshold, compute_loss=work.loss_of)
        return pruner.get_sparsity()

    separate, prunes, separate_evals = {"sparsities": [], "metrics": []}, Stopwatch(), Stopwatch()
    for threshold in thresholds:
        with kept_weights(model):
            separate["sparsities"].append(prunes.wrap(prune_once)(threshold))
            separate["metrics"].append(separate_evals.wrap(evaluate)(model))
    separate_total = prunes.total + separate_evals.total
    sweep_no_eval = sweep_s - sweep_eval
    return {
        "workload": work.name, "num_batches": len(batches), "eval_batches": len(eval_batches),
        "thresholds": list(thresholds), "sweep_s": asdict(sweep_s), "sweep_eval_s": asdict(sweep_eval),
        "separate_prunes_s": asdict(prunes.total), "separate_eval_s": asdict(separate_evals.total),
        "speedup_with_eval_wall": separate_total.wall / sweep_s.wall,
        "speedup_with_eval_cpu": separate_total.cpu / sweep_s.cpu,
        "speedup_without_eval_wall": prunes.total.wall / sweep_no_eval.wall,
        "speedup_without_eval_cpu": prunes.total.cpu / sweep_no_eval.cpu,
        "sweep_sparsities": sweep["sparsities"], "separate_sparsities": separate["sparsities"],
        "same_results": sweep["sparsities"] == separate["sparsities"] and sweep["metrics"] == separate["metrics"],
        "target": 5.0,
    }


# -- 3. where probing stalls ----------------------------------------------------------------
def stall_table(s: Settings) -> dict:
    """Per strategy and target: what fraction of all prunable weights each threshold prunes,
    and how the tentatively selected weights' gradient statistic behaved."""
    data = subjects.digits_data()
    model = subjects.digits_model(data, s.digits_hidden, s.digits_steps)
    with torch.no_grad():
        accuracy = float((model(data.test_x).argmax(1) == data.test_y).float().mean())
    b = s.digits_batch
    batches = [(data.train_x[i * b:(i + 1) * b], data.train_y[i * b:(i + 1) * b]) for i in range(s.digits_calib_batches)]
    work = Workload("digits MLP", model, batches, classifier_loss)
    rows = []
    for name in ("magnitude (layer)", "wanda"):
        pruner = GradProbe(model, STRATEGIES[name]())
        for target in s.stall_sparsities:
            record = probe(pruner, work, sparsity=target)
            layers = record.layers.values()
            total = sum(layer.tentative.numel() for layer in layers)
            old = torch.cat([layer.old.float() for layer in layers])
            new = torch.cat([layer.new.float() for layer in layers])
            row = {"strategy": name, "target": target, "selected": old.numel() / total,
                   "zero_grad_share": share(old == 0), "revived_share": share((old == 0) & (new > 0)),
                   "grew_share": share(new > old)}
            for threshold in s.stall_thresholds:
                pruned = sum(int(mask.sum()) for mask in record.masks(threshold).values())
                row[f"reached@{threshold:g}"] = pruned / total
            rows.append(row)
    return {"model": f"SimpleMLP 64-{'-'.join(map(str, s.digits_hidden))}-10, ReLU, "
                     f"{s.digits_steps} Adam steps", "test_accuracy": accuracy,
            "calibration": f"{len(batches)} batches of {s.digits_batch}",
            "thresholds": list(s.stall_thresholds), "rows": rows}


def share(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if flags.numel() else 0.0


# -- 4. ranks x parallel modes --------------------------------------------------------------
def probe_state_bytes(pruner: GradProbe, record) -> dict:
    """Bytes the probe holds on this rank: one pass's statistic (one value per local weight
    element, in ``stat_dtype``) plus the record (tentative masks, the baseline statistic,
    originals and the reduced statistic of the selected weights). The peak is during the
    second pass: its statistic next to masks, baseline and originals."""
    statistic = sum(pruner.backend.local_weight(n).numel() for n in pruner.param_names) * pruner.stat_dtype.itemsize
    held = {part: sum(getattr(layer, part).nbytes for layer in record.layers.values())
            for part in ("tentative", "old", "originals", "new")}
    return {"statistic": statistic, **held, "peak": statistic + held["tentative"] + held["old"] + held["originals"]}


def gloo_seconds(profiler) -> float:
    """Seconds spent inside gloo collectives (their own events, recorded on gloo's threads)."""
    return sum(e.cpu_time_total for e in profiler.key_averages() if e.key.startswith("gloo:")) / 1e6


def rank_probes(rank: int, world_size: int, modes: tuple[str, ...], spec: MLPSpec, repeats: int) -> dict:
    """On one rank, for each mode: a fresh model and backend, a warm-up, then ``repeats``
    profiled probes; the median one by wall time is reported."""
    from torch.profiler import ProfilerActivity, profile

    from gradprobe_dist.parallel import build_backend

    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated calls
    results = {}
    for mode in modes:
        work = mlp_workload(spec, data_seed=rank)
        backend = build_backend(mode, torch.device("cpu"), micro_batch_size=spec.micro_batch)
        strategy = TimedStrategy(MagnitudePruning("layer"))
        pruner = GradProbe(work.model, strategy, backend=backend)

        def warm_up():  # shard / build the engine, then one forward+backward
            wrapped = backend.prepare(work.model, pruner.param_names)
            backend.backward(work.loss_of(wrapped, work.batches[0]))
            backend.zero_grad()
            backend.release()

        _, setup = timed(warm_up)
        runs = []
        for _ in range(repeats):
            before = strategy.watch.total
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                record, took = timed(probe, pruner, work)
            runs.append((took, gloo_seconds(prof), (strategy.watch.total - before).wall))
        took, comm, selection = sorted(runs, key=lambda run: run[0].wall)[(repeats - 1) // 2]
        results[mode] = {"setup_s": setup.wall, "probe_wall_s": took.wall, "probe_cpu_s": took.cpu,
                         "comm_s": comm, "selection_s": selection, "state_bytes": probe_state_bytes(pruner, record),
                         "peak_rss_bytes": peak_rss_bytes(),  # before probe_rss_growth restarts the counter
                         "probe_rss_growth_bytes": probe_rss_growth(pruner, work)}
    return results


def probe_rss_growth(pruner: GradProbe, work: Workload) -> int | None:
    """Peak RSS during one more probe minus RSS before it, with glibc returning freed memory
    at once (after the timings: it slows allocation), so that the growth is what the probe
    really has allocated at its peak: gradients, probe state and temporaries. None where
    Linux/glibc do not let us measure it."""
    before = current_rss_bytes() if return_freed_memory() else 0
    if not (before and reset_peak_rss()):
        return None
    probe(pruner, work)
    return peak_rss_bytes() - before


def ranks_table(s: Settings, modes: tuple[str, ...]) -> dict:
    """Every mode on 1 and 2 ranks ("none" on 1 only), one launch per mode and rank count
    (smoke: one launch per rank count, modes in turn, so peak RSS is then shared)."""
    spec = s.wide_mlp
    rows = []
    for world in (1, 2):
        runnable = tuple(m for m in modes if world == 1 or m != "none")
        for group in ([(m,) for m in runnable] if s.process_per_mode else [runnable]):
            log.info("ranks: %s on %d rank(s)", ", ".join(group), world)
            per_rank = [r.value for r in run_ranks(rank_probes, world, group, spec, s.rank_repeats,
                                                   timeout=s.rank_timeout_s)]
            rows += [rank_row(mode, world, [r[mode] for r in per_rank]) for mode in group]
    rows.sort(key=lambda row: (MODES.index(row["mode"]), row["ranks"]))
    one_rank = {row["mode"]: row for row in rows if row["ranks"] == 1}
    for row in rows:
        base = one_rank[row["mode"]]
        row["wall_vs_1_rank"] = row["probe_wall_s"] / base["probe_wall_s"]
        row["state_vs_1_rank"] = row["state_mib"] / base["state_mib"]
        if row["mode"] in ("fsdp", "zero3") and row["ranks"] == 2:
            row["meets_state_target"] = row["state_vs_1_rank"] <= 0.55
    dims = "-".join(map(str, (spec.input_dim, *spec.hidden, spec.classes)))
    return {"model": f"SimpleMLP {dims} ({count_prunable(mlp_workload(spec).model):,} prunable weights)",
            "micro_batch": spec.micro_batch, "num_batches": spec.num_batches, "repeats": s.rank_repeats,
            "process_per_mode": s.process_per_mode, "rows": rows}


def rank_row(mode: str, world: int, per_rank: list[dict]) -> dict:
    """One table row from every rank's numbers: the slowest / largest rank, mean comm share."""
    growth = [r["probe_rss_growth_bytes"] for r in per_rank]
    return {
        "mode": mode, "ranks": world,
        "setup_s": max(r["setup_s"] for r in per_rank),
        "probe_wall_s": max(r["probe_wall_s"] for r in per_rank),
        "probe_cpu_s": max(r["probe_cpu_s"] for r in per_rank),
        "comm_share": sum(r["comm_s"] / r["probe_wall_s"] for r in per_rank) / world,
        "selection_s": max(r["selection_s"] for r in per_rank),
        "state_mib": max(r["state_bytes"]["peak"] for r in per_rank) / MiB,
        "state_parts_mib": {k: v / MiB for k, v in per_rank[0]["state_bytes"].items()},
        "peak_rss_mib": max(r["peak_rss_bytes"] for r in per_rank) / MiB,
        "probe_rss_growth_mib": None if None in growth else max(growth) / MiB,
    }


# -- 5. selection ---------------------------------------------------------------------------
def selection_costs(work: Workload, repeats: int) -> list[dict]:
    """Each strategy's ``select`` timed inside one-batch probes (median of repeats)."""
    model, batch = work.model, work.batches[:1]
    model.eval()

    def fwd_bwd():
        work.loss_of(model, batch[0]).backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd()
    one_pass = median([timed(fwd_bwd)[1] for _ in range(repeats)])
    rows = []
    for name, make in STRATEGIES.items():
        strategy = TimedStrategy(make())
        pruner = GradProbe(model, strategy)
        probe(pruner, work, batch)  # warm-up
        selections, totals = [], []
        for _ in range(repeats):
            before = strategy.watch.total
            totals.append(timed(probe, pruner, work, batch)[1])
            selections.append(strategy.watch.total - before)
        sel, total = median(selections), median(totals)
        rows.append({"workload": work.name, "prunable_weights": count_prunable(model), "strategy": name,
                     "selection_s": sel.wall, "selection_cpu_s": sel.cpu, "probe_s": total.wall,
                     "selection_share": sel.wall / total.wall, "fwd_bwd_s": one_pass.wall,
                     "selection_over_fwd_bwd": sel.wall / one_pass.wall})
    return rows


# -- entry point ------------------------------------------------------------------------------
def run(s: Settings, sections: tuple[str, ...], modes: tuple[str, ...]) -> dict:
    results = {}
    if "probe" in sections:
        log.info("probe vs floor")
        results["probe_vs_floor"] = [probe_vs_floor(gpt_workload(s.gpt, s.gpt_micro_batch, s.gpt_batches), s.repeats),
                                     probe_vs_floor(mlp_workload(s.mlp), s.repeats)]
    if "sweep" in sections:
        log.info("sweep vs separate prunes")
        results["sweep"] = sweep_vs_separate(gpt_workload(s.gpt, s.gpt_micro_batch, s.sweep_batches), text_batches("valid", s.gpt["block_size"], s.gpt_micro_batch, s.eval_batches),
                                             s.sweep_thresholds)
    if "stall" in sections:
        log.info("stalls on digits")
        results["stall"] = stall_table(s)
    if "ranks" in sections:
        results["ranks"] = ranks_table(s, modes)
    if "selection" in sections:
        log.info("selection")
        results["selection"] = (selection_costs(gpt_workload(s.gpt, s.gpt_micro_batch, 1), s.repeats)
                                + selection_costs(mlp_workload(s.wide_mlp), s.repeats))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, not the numbers")
    parser.add_argument("--out", default="bench/results", help="directory for cost.json and cost.md")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="parallel modes of section 4")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else FULL
    meta = run_meta(args.smoke, settings=asdict(settings), sparsity=SPARSITY, reduction_factor=REDUCTION)
    results = run(settings, tuple(args.sections), tuple(args.modes))
    meta["load_average_1m_at_end"] = os.getloadavg()[0]
    flatten_for_tables(results)
    data = {"meta": meta, **results}
    markdown = to_markdown(data)
    print(markdown)
    json_path, md_path = write_report(args.out, "cost", data, markdown)
    log.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
