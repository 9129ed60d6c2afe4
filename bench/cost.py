"""Cost benchmark: what a probe costs next to the forward+backward work it cannot avoid.

1. Probe vs its floor: a probe is two gradient passes over ``num_batches`` batches, so its
   ideal time is 2 x (forward+backward over those batches). Both are timed in one process,
   interleaved, median of repeats, with a per-phase breakdown of one instrumented probe.
2. A sweep of 5 thresholds (one probe) vs 5 separate prunes.
3. Where probing stalls: on a ReLU MLP trained on scikit-learn digits, the sparsity reached
   at thresholds 0 / 0.1 / 1.0 against the target, and how many selected weights had an
   exactly zero gradient.
4. 1 vs 2 ranks per parallel mode (none / ddp / fsdp / zero3), on real gloo processes:
   probe wall time, share of it inside collectives, probe state and peak RSS per rank.
5. Selection time of each strategy inside a probe.

    python bench/cost.py [--smoke] [--out bench/results] [--sections probe sweep ...]

Prints the Markdown tables and writes ``cost.json`` and ``cost.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # ZeRO-3 on CPU

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradprobe_dist import GradProbe, MagnitudePruning, RandomPruning, SimpleMLP, WandaPruning  # noqa: E402
from gradprobe_dist import statistics as grad_statistics  # noqa: E402
from gradprobe_dist.data.shards import bundled_text_path  # noqa: E402
from gradprobe_dist.runtime.log import get_logger  # noqa: E402
from gradprobe_dist.models import TinyGPT, TinyGPTConfig  # noqa: E402
from gradprobe_dist.probe.params import find_prunable  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import (Seconds, current_rss_bytes, launch_ranks, machine, markdown_table,  # noqa: E402
                    median, peak_rss_bytes, reset_peak_rss, return_freed_memory, rss_high_water_bytes,
                    timed, write_results)

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
class MLPSpec:
    """A SimpleMLP and the synthetic batches it is timed on (cost does not depend on the data)."""

    input_dim: int
    hidden: tuple[int, ...]
    classes: int
    micro_batch: int
    num_batches: int


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
    digits_steps: int = 300
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


# -- workloads ------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model, its calibration batches and how a batch becomes a loss."""

    name: str
    model: nn.Module
    batches: list
    loss_of: Callable[[nn.Module, object], torch.Tensor]


def _count_prunable(model: nn.Module) -> int:
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in find_prunable(model))


def gpt_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def classifier_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def text_batches(split: str, block_size: int, micro_batch: int, count: int) -> list[dict]:
    """Consecutive byte windows of the bundled Shakespeare excerpt, as LM batches."""
    data = torch.frombuffer(bytearray(bundled_text_path(split).read_bytes()), dtype=torch.uint8)
    needed = count * micro_batch * block_size
    if needed > data.numel():
        raise ValueError(f"{count} batches of {micro_batch} x {block_size} bytes need {needed} bytes; "
                         f"the bundled {split} text has {data.numel()}: lower the batch settings")
    windows = data[:needed].long().view(count * micro_batch, block_size)
    return [{"input_ids": w, "labels": w} for w in windows.split(micro_batch)]


def gpt_workload(s: Settings, num_batches: int) -> Workload:
    torch.manual_seed(0)
    config = TinyGPTConfig(**s.gpt)
    batches = text_batches("train", config.block_size, s.gpt_micro_batch, num_batches)
    dims = ", ".join(f"{k} {v}" for k, v in s.gpt.items())
    return Workload(f"TinyGPT ({dims}), micro-batch {s.gpt_micro_batch}", TinyGPT(config), batches, gpt_loss)


def mlp_workload(spec: MLPSpec, data_seed: int = 0) -> Workload:
    """Weights seeded identically everywhere; ``data_seed`` (e.g. the rank) picks the batches."""
    torch.manual_seed(0)
    model = SimpleMLP(spec.input_dim, spec.hidden, spec.classes)
    gen = torch.Generator().manual_seed(1000 + data_seed)
    batches = [(torch.randn(spec.micro_batch, spec.input_dim, generator=gen),
                torch.randint(0, spec.classes, (spec.micro_batch,), generator=gen))
               for _ in range(spec.num_batches)]
    dims = "-".join(map(str, (spec.input_dim, *spec.hidden, spec.classes)))
    return Workload(f"SimpleMLP {dims}, micro-batch {spec.micro_batch}", model, batches, classifier_loss)


def probe(pruner: GradProbe, work: Workload, batches: list | None = None,
          loss_of: Callable | None = None, sparsity: float = SPARSITY):
    """``pruner.probe`` on the workload's batches (or ``batches``) with the benchmark's settings."""
    batches = work.batches if batches is None else batches
    return pruner.probe(batches, None, sparsity=sparsity, num_batches=len(batches),
                        reduction_factor=REDUCTION, compute_loss=loss_of or work.loss_of)


@contextmanager
def kept_weights(model: nn.Module):
    """Put every parameter back bit-exactly on exit (separate prunes each start from the same model)."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


class PhaseTimer:
    """Bench-only instrumentation: while ``patched`` is active, each call of a chosen function
    adds its seconds to a named phase. Phases nest (a pass contains its backward), so
    exclusive times are differences, computed by the caller."""

    def __init__(self):
        self.seconds: dict[str, Seconds] = {}

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            result, took = timed(fn, *args, **kwargs)
            total = self.seconds.setdefault(phase, Seconds(0.0, 0.0))
            total.wall += took.wall
            total.cpu += took.cpu
            return result
        return timed_call

    def get(self, phase: str) -> Seconds:
        return self.seconds.get(phase, Seconds(0.0, 0.0))

    @contextmanager
    def patched(self, targets: dict[str, tuple[object, str]]):
        """Replace ``owner.attr`` by a timed wrapper for each phase; restored on exit."""
        saved = []
        try:
            for phase, (owner, attr) in targets.items():
                saved.append((owner, attr, attr in vars(owner), getattr(owner, attr)))
                setattr(owner, attr, self.wrap(phase, getattr(owner, attr)))
            yield self
        finally:
            for owner, attr, own, original in reversed(saved):
                if own:
                    setattr(owner, attr, original)
                else:
                    delattr(owner, attr)  # it was the class's method: drop the instance override


def _minus(a: Seconds, *others: Seconds) -> Seconds:
    return Seconds(a.wall - sum(o.wall for o in others), a.cpu - sum(o.cpu for o in others))


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
    two_passes = Seconds(2 * floor_s.wall, 2 * floor_s.cpu)
    return {
        "workload": work.name, "prunable_weights": _count_prunable(model),
        "num_batches": len(batches), "repeats": repeats,
        "fwd_bwd_per_batch_s": floor_s.wall / len(batches),
        "floor_s": asdict(two_passes), "probe_s": asdict(probe_s), "prune_s": asdict(prune_s),
        "probe_over_floor_wall": probe_s.wall / two_passes.wall, "probe_over_floor_cpu": probe_s.cpu / two_passes.cpu,
        "prune_over_floor_wall": prune_s.wall / two_passes.wall, "prune_over_floor_cpu": prune_s.cpu / two_passes.cpu,
        "target": 1.05, "meets_target_wall": probe_s.wall / two_passes.wall <= 1.05,
        "meets_target_cpu": probe_s.cpu / two_passes.cpu <= 1.05,
        "breakdown": probe_breakdown(pruner, work, two_passes),
    }


def probe_breakdown(pruner: GradProbe, work: Workload, floor: Seconds) -> list[dict]:
    """One instrumented probe, split into exclusive phases that add up to its total."""
    timer = PhaseTimer()
    targets = {
        "passes": (pruner, "_gradient_pass"),
        "backward": (pruner.backend, "backward"),
        "statistic fold": (grad_statistics, "accumulate"),
        "finite-flag all-reduce": (pruner, "_check_pass_finite"),
        "selection": (pruner.strategy, "select"),
        "scale selected": (pruner, "_scale_selected"),
        "restore": (pruner, "_restore"),
    }
    with timer.patched(targets):
        _, total = timed(probe, pruner, work, None, timer.wrap("forward", work.loss_of))
    t = timer.get
    phases = {
        "forward": t("forward"),
        "backward": t("backward"),
        "statistic fold (statistics.accumulate)": t("statistic fold"),
        "finite check, once per pass (_check_pass_finite)": t("finite-flag all-reduce"),
        "rest of the passes (grads, accumulators, progress)":
            _minus(t("passes"), t("forward"), t("backward"), t("statistic fold"), t("finite-flag all-reduce")),
        "selection (strategy.select)": t("selection"),
        "scale selected (_scale_selected)": t("scale selected"),
        "restore (_restore)": t("restore"),
        "rest of probe (prepare, mask checks, new-stat gather)":
            _minus(total, t("passes"), t("selection"), t("scale selected"), t("restore")),
    }
    rows = [{"phase": name, "wall_s": s.wall, "cpu_s": s.cpu, "share": s.wall / total.wall}
            for name, s in phases.items()]
    fwd_bwd = Seconds(t("forward").wall + t("backward").wall, t("forward").cpu + t("backward").cpu)
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
    eval_time = PhaseTimer()

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.stack([work.loss_of(m, b) for b in eval_batches]).mean())

    timed_evaluate = eval_time.wrap("eval", evaluate)
    probe(pruner, work, batches[:1])  # warm-up
    with eval_time.patched({"probe": (pruner, "probe")}):
        sweep, sweep_s = timed(pruner.sweep_gradient_thresholds, batches, None, timed_evaluate,
                               sparsity=SPARSITY, thresholds=thresholds, num_batches=len(batches),
                               reduction_factor=REDUCTION, compute_loss=work.loss_of)
    sweep_eval, sweep_probe = eval_time.get("eval"), eval_time.get("probe")

    def prune_once(threshold: float) -> float:
        pruner.prune(batches, None, sparsity=SPARSITY, num_batches=len(batches), reduction_factor=REDUCTION,
                     gradient_threshold=threshold, compute_loss=work.loss_of)
        return pruner.get_sparsity()

    separate, prunes, evals = {"sparsities": [], "metrics": []}, [], []
    for threshold in thresholds:
        with kept_weights(model):
            sparsity, took = timed(prune_once, threshold)
            prunes.append(took)
            separate["sparsities"].append(sparsity)
            metric, took = timed(evaluate, model)
            separate["metrics"].append(metric)
            evals.append(took)
    prune_total = Seconds(sum(s.wall for s in prunes), sum(s.cpu for s in prunes))
    eval_total = Seconds(sum(s.wall for s in evals), sum(s.cpu for s in evals))
    separate_total = Seconds(prune_total.wall + eval_total.wall, prune_total.cpu + eval_total.cpu)
    sweep_no_eval = _minus(sweep_s, sweep_eval)
    return {
        "workload": work.name, "num_batches": len(batches), "eval_batches": len(eval_batches),
        "thresholds": list(thresholds),
        "sweep_s": asdict(sweep_s), "sweep_eval_s": asdict(sweep_eval), "sweep_probe_s": asdict(sweep_probe),
        "sweep_decisions_s": asdict(_minus(sweep_s, sweep_eval, sweep_probe)),
        "separate_prunes_s": asdict(prune_total), "separate_eval_s": asdict(eval_total),
        "speedup_with_eval_wall": separate_total.wall / sweep_s.wall,
        "speedup_with_eval_cpu": separate_total.cpu / sweep_s.cpu,
        "speedup_without_eval_wall": prune_total.wall / sweep_no_eval.wall,
        "speedup_without_eval_cpu": prune_total.cpu / sweep_no_eval.cpu,
        "sweep_sparsities": sweep["sparsities"], "separate_sparsities": separate["sparsities"],
        "same_results": sweep["sparsities"] == separate["sparsities"]
                        and sweep["metrics"] == separate["metrics"],
        "target": 5.0,
    }


# -- 3. where probing stalls ----------------------------------------------------------------
def digits_subject(s: Settings) -> tuple[nn.Module, list, float]:
    """A ReLU SimpleMLP trained briefly on scikit-learn digits (pixels / 16); returns the
    model, calibration batches from the training split and the test accuracy."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(images, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(labels)[order]
    split = int(0.8 * len(x))
    torch.manual_seed(0)
    model = SimpleMLP(x.shape[1], s.digits_hidden, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(s.digits_steps):
        idx = torch.randint(0, split, (s.digits_batch,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        accuracy = float((model(x[split:]).argmax(1) == y[split:]).float().mean())
    b = s.digits_batch
    batches = [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(s.digits_calib_batches)]
    return model, batches, accuracy


def stall_table(s: Settings) -> dict:
    """Per strategy and target: what fraction of all prunable weights each threshold prunes,
    and how the tentatively selected weights' gradient statistic behaved."""
    model, batches, accuracy = digits_subject(s)
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
                   "zero_grad_share": _share(old == 0), "revived_share": _share((old == 0) & (new > 0)),
                   "grew_share": _share(new > old)}
            for threshold in s.stall_thresholds:
                pruned = sum(int(mask.sum()) for mask in record.masks(threshold).values())
                row[f"reached@{threshold:g}"] = pruned / total
            rows.append(row)
    return {"model": f"SimpleMLP 64-{'-'.join(map(str, s.digits_hidden))}-10, ReLU, "
                     f"{s.digits_steps} Adam steps", "test_accuracy": accuracy,
            "calibration": f"{len(batches)} batches of {s.digits_batch}",
            "thresholds": list(s.stall_thresholds), "rows": rows}


def _share(flags: torch.Tensor) -> float:
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
    return {"statistic": statistic, **held,
            "peak": statistic + held["tentative"] + held["old"] + held["originals"]}


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
        pruner = GradProbe(work.model, MagnitudePruning("layer"), backend=backend)

        def warm_up():  # shard / build the engine, then one forward+backward
            wrapped = backend.prepare(work.model, pruner.param_names)
            backend.backward(work.loss_of(wrapped, work.batches[0]))
            backend.zero_grad()
            backend.release()

        _, setup = timed(warm_up)
        runs = []
        for _ in range(repeats):
            timer = PhaseTimer()
            with profile(activities=[ProfilerActivity.CPU]) as prof, \
                    timer.patched({"selection": (pruner.strategy, "select")}):
                record, took = timed(probe, pruner, work)
            runs.append((took, gloo_seconds(prof), timer.get("selection").wall))
        took, comm, selection = sorted(runs, key=lambda run: run[0].wall)[(repeats - 1) // 2]
        results[mode] = {"setup_s": setup.wall, "probe_wall_s": took.wall, "probe_cpu_s": took.cpu,
                         "comm_s": comm, "selection_s": selection,
                         "state_bytes": probe_state_bytes(pruner, record),
                         "peak_rss_bytes": peak_rss_bytes(),
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
    return rss_high_water_bytes() - before


def ranks_table(s: Settings, modes: tuple[str, ...]) -> dict:
    """Every mode on 1 and 2 ranks ("none" on 1 only), one launch per mode and rank count
    (smoke: one launch per rank count, modes in turn, so peak RSS is then shared)."""
    spec = s.wide_mlp
    rows = []
    for world in (1, 2):
        runnable = tuple(m for m in modes if world == 1 or m != "none")
        for group in ([(m,) for m in runnable] if s.process_per_mode else [runnable]):
            log.info("ranks: %s on %d rank(s)", ", ".join(group), world)
            per_rank = launch_ranks(rank_probes, world, group, spec, s.rank_repeats, timeout=s.rank_timeout_s)
            for mode in group:
                rows.append(_rank_row(mode, world, [r[mode] for r in per_rank]))
    rows.sort(key=lambda row: (MODES.index(row["mode"]), row["ranks"]))
    one_rank = {row["mode"]: row for row in rows if row["ranks"] == 1}
    for row in rows:
        base = one_rank[row["mode"]]
        row["wall_vs_1_rank"] = row["probe_wall_s"] / base["probe_wall_s"]
        row["state_vs_1_rank"] = row["state_mib"] / base["state_mib"]
        if row["mode"] in ("fsdp", "zero3") and row["ranks"] == 2:
            row["meets_state_target"] = row["state_vs_1_rank"] <= 0.55
    dims = "-".join(map(str, (spec.input_dim, *spec.hidden, spec.classes)))
    return {"model": f"SimpleMLP {dims} ({_count_prunable(mlp_workload(spec).model):,} prunable weights)",
            "micro_batch": spec.micro_batch, "num_batches": spec.num_batches, "repeats": s.rank_repeats,
            "process_per_mode": s.process_per_mode, "rows": rows}


def _rank_row(mode: str, world: int, per_rank: list[dict]) -> dict:
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
        pruner = GradProbe(model, make())
        probe(pruner, work, batch)  # warm-up
        selections, totals = [], []
        for _ in range(repeats):
            timer = PhaseTimer()
            with timer.patched({"selection": (pruner.strategy, "select")}):
                totals.append(timed(probe, pruner, work, batch)[1])
            selections.append(timer.get("selection"))
        sel, total = median(selections), median(totals)
        rows.append({"workload": work.name, "prunable_weights": _count_prunable(model), "strategy": name,
                     "selection_s": sel.wall, "selection_cpu_s": sel.cpu, "probe_s": total.wall,
                     "selection_share": sel.wall / total.wall, "fwd_bwd_s": one_pass.wall,
                     "selection_over_fwd_bwd": sel.wall / one_pass.wall})
    return rows


# -- report ---------------------------------------------------------------------------------
def run(s: Settings, sections: tuple[str, ...], modes: tuple[str, ...]) -> dict:
    results = {}
    if "probe" in sections:
        log.info("probe vs floor")
        results["probe_vs_floor"] = [probe_vs_floor(gpt_workload(s, s.gpt_batches), s.repeats),
                                     probe_vs_floor(mlp_workload(s.mlp), s.repeats)]
    if "sweep" in sections:
        log.info("sweep vs separate prunes")
        config = TinyGPTConfig(**s.gpt)
        eval_batches = text_batches("valid", config.block_size, s.gpt_micro_batch, s.eval_batches)
        results["sweep"] = sweep_vs_separate(gpt_workload(s, s.sweep_batches), eval_batches, s.sweep_thresholds)
    if "stall" in sections:
        log.info("stalls on digits")
        results["stall"] = stall_table(s)
    if "ranks" in sections:
        results["ranks"] = ranks_table(s, modes)
    if "selection" in sections:
        log.info("selection")
        results["selection"] = (selection_costs(gpt_workload(s, 1), s.repeats)
                                + selection_costs(mlp_workload(s.wide_mlp), s.repeats))
    return results


SECONDS = "0.3f"
RATIO = "0.3f"


def md_header(meta: dict) -> list[str]:
    m = meta["machine"]
    return [f"# Cost benchmark{' (smoke run: sizes too small for conclusions)' if meta['smoke'] else ''}",
            "",
            f"`{meta['command']}` on {m['date_utc']}: {m['cpu_cores']} x {m['cpu_model']}, "
            f"{m['memory_gib']} GiB, torch {m['torch']}, deepspeed {m['deepspeed']}, "
            f"{m['threads_per_process']} thread per process; 1-min load average "
            f"{m['load_average_1m_at_start']:.2f} at the start, {meta['load_average_1m_at_end']:.2f} "
            f"at the end. Sparsity {SPARSITY}, reduction factor {REDUCTION}, statistic max_abs. "
            "Wall-clock times unless marked CPU (process CPU time, which other processes on the "
            "machine do not inflate)."]


def md_probe(rows: list[dict]) -> list[str]:
    out = ["## 1. Probe cost vs its floor", "",
           "Floor: forward+backward over the same calibration batches in the same process, "
           "twice (the probe's two passes cannot do with less), as in training: every parameter's "
           "gradient. The probe asks for the prunable weights' gradients only (embeddings, norms "
           "and biases are frozen while it runs), so its passes can cost a little less than the "
           "floor. Floor, probe and prune repeats "
           "are interleaved; medians. Magnitude (layer) selection. Target: probe / floor <= 1.05.", "",
           markdown_table(rows, [
               ("workload", "workload", "s"), ("prunable_weights", "prunable weights", ","),
               ("num_batches", "batches", "d"), ("fwd_bwd_per_batch_s", "fwd+bwd per batch (s)", SECONDS),
               ("floor_wall", "floor: 2 x fwd+bwd (s)", SECONDS), ("probe_wall", "probe (s)", SECONDS),
               ("probe_over_floor_wall", "probe / floor", RATIO), ("probe_over_floor_cpu", "probe / floor (CPU)", RATIO),
               ("prune_over_floor_wall", "prune / floor", RATIO), ("prune_over_floor_cpu", "prune / floor (CPU)", RATIO)])]
    for row in rows:
        out += ["", f"Breakdown of one instrumented probe, {row['workload']} (exclusive phases):", "",
                markdown_table(row["breakdown"], [
                    ("phase", "phase", "s"), ("wall_s", "wall (s)", SECONDS), ("cpu_s", "CPU (s)", SECONDS),
                    ("share", "share of probe", ".1%")])]
    return out


def md_sweep(sw: dict) -> list[str]:
    return ["## 2. Threshold sweep vs separate prunes", "",
            f"{sw['workload']}, {sw['num_batches']} calibration batches, thresholds "
            f"{sw['thresholds']}; at each threshold the sparsity is read and the model evaluated "
            f"(loss on {sw['eval_batches']} held-out batches). Separate prunes reset the weights "
            "in between (not timed). Same sparsities and metrics from both: "
            f"{sw['same_results']}. Target: about 5x.", "",
            markdown_table([sw], [
                ("sweep_wall", "sweep (s)", SECONDS), ("sweep_probe_wall", "its probe (s)", SECONDS),
                ("sweep_decisions_wall", "its decisions + restores (s)", SECONDS),
                ("sweep_eval_wall", "its evals (s)", SECONDS),
                ("separate_wall", f"{len(sw['thresholds'])} prunes + evals (s)", SECONDS),
                ("speedup_with_eval_wall", "speed-up", "0.2f"), ("speedup_with_eval_cpu", "speed-up (CPU)", "0.2f"),
                ("speedup_without_eval_wall", "speed-up, evals excluded", "0.2f"),
                ("speedup_without_eval_cpu", "speed-up, evals excluded (CPU)", "0.2f")])]


def md_stall(st: dict) -> list[str]:
    return ["## 3. Where GradProbe stalls (ReLU MLP on digits)", "",
            f"{st['model']} (test accuracy {st['test_accuracy']:.3f}); calibration "
            f"{st['calibration']}. `reached@t`: fraction of all prunable weights pruned at "
            "threshold t. Shares of the selected weights: `zero-grad`, baseline statistic exactly "
            "0 (pruned if it stays 0); `revived`, 0 at baseline but not after the reduction "
            "(new/old is infinite: restored at every threshold); `grew`, statistic grew "
            "after the reduction (restored at threshold 0).", "",
            markdown_table(st["rows"], [
                ("strategy", "strategy", "s"), ("target", "target", ".0%"), ("selected", "selected", ".1%"),
                ("zero_grad_share", "zero-grad", ".1%"), ("revived_share", "revived", ".1%"),
                ("grew_share", "grew", ".1%")]
                + [(f"reached@{t:g}", f"reached@{t:g}", ".1%") for t in st["thresholds"]])]


def md_ranks(rk: dict) -> list[str]:
    return ["## 4. 1 vs 2 ranks per parallel mode", "",
            f"{rk['model']}, each rank feeds {rk['num_batches']} micro-batches of "
            f"{rk['micro_batch']} (its own data), magnitude (layer) selection; real gloo "
            f"processes, the median of {rk['repeats']} probes after a warm-up forward+backward; "
            "per row the worst rank. Setup (sharding, DeepSpeed engine) is not in the probe time. "
            "`comm share`: time inside gloo collectives (torch.profiler's `gloo:*` events, which "
            "run on gloo's threads and include waiting for the other rank) / probe wall time, "
            "mean over ranks; where collectives overlap compute (DDP's buckets) it bounds the "
            "exposed cost from above. `probe state`: one pass's statistic + tentative masks + "
            "baseline statistic + originals of the selected weights (held together during the "
            "second pass), summed from the tensors' sizes. `peak RSS`: whole process "
            "(getrusage), including building the full model before sharding. `probe RSS growth`: "
            "peak RSS during one more probe minus RSS just before it (Linux clear_refs), with "
            "glibc told to return freed memory at once (mallopt), so it counts what the probe "
            "allocates at its peak: gradients, probe state and temporaries. "
            "Target: fsdp and zero3 at 2 ranks hold <= 0.55 x the probe state of 1 rank.", "",
            markdown_table(rk["rows"], [
                ("mode", "mode", "s"), ("ranks", "ranks", "d"), ("setup_s", "setup (s)", "0.2f"),
                ("probe_wall_s", "probe (s)", "0.2f"), ("probe_cpu_s", "probe CPU (s)", "0.2f"),
                ("wall_vs_1_rank", "time vs 1 rank", "0.2f"), ("comm_share", "comm share", ".1%"),
                ("selection_s", "of which selection (s)", "0.2f"),
                ("state_mib", "probe state (MiB)", "0.1f"), ("state_vs_1_rank", "state vs 1 rank", "0.3f"),
                ("peak_rss_mib", "peak RSS (MiB)", "0.0f"),
                ("probe_rss_growth_mib", "probe RSS growth (MiB)", "0.0f")])]


def md_selection(rows: list[dict]) -> list[str]:
    return ["## 5. Selection time per strategy", "",
            "`strategy.select` timed inside one-batch probes (median of repeats), next to one "
            "forward+backward of that batch. Wanda's input norms are gathered by hooks during "
            "the baseline pass (in the probe time, not in the selection time).", "",
            markdown_table(rows, [
                ("workload", "workload", "s"), ("strategy", "strategy", "s"),
                ("selection_s", "selection (s)", SECONDS), ("selection_cpu_s", "selection CPU (s)", SECONDS),
                ("probe_s", "1-batch probe (s)", SECONDS), ("selection_share", "share", ".1%"),
                ("selection_over_fwd_bwd", "selection / one fwd+bwd", "0.2f")])]


MARKDOWN = {"probe_vs_floor": md_probe, "sweep": md_sweep, "stall": md_stall, "ranks": md_ranks,
            "selection": md_selection}


def to_markdown(data: dict) -> str:
    out = md_header(data["meta"])
    for key, write in MARKDOWN.items():
        if key in data:
            out += ["", *write(data[key])]
    return "\n".join(out)


def _flatten_for_tables(results: dict) -> None:
    """Add the scalar columns the tables print (the JSON keeps the nested values too)."""
    for row in results.get("probe_vs_floor", []):
        row["floor_wall"], row["probe_wall"] = row["floor_s"]["wall"], row["probe_s"]["wall"]
    if "sweep" in results:
        sw = results["sweep"]
        for part in ("sweep", "sweep_probe", "sweep_decisions", "sweep_eval"):
            sw[f"{part}_wall"] = sw[f"{part}_s"]["wall"]
        sw["separate_wall"] = sw["separate_prunes_s"]["wall"] + sw["separate_eval_s"]["wall"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, not the numbers")
    parser.add_argument("--out", default="bench/results", help="directory for cost.json and cost.md")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="parallel modes of section 4")
    args = parser.parse_args()
    settings = SMOKE if args.smoke else FULL
    meta = {"command": shlex.join(["python", *sys.argv]),
            "smoke": args.smoke, "machine": machine(), "settings": asdict(settings)}
    results = run(settings, tuple(args.sections), tuple(args.modes))
    meta["load_average_1m_at_end"] = os.getloadavg()[0]
    _flatten_for_tables(results)
    data = {"meta": meta, **results}
    markdown = to_markdown(data)
    print(markdown)
    json_path, md_path = write_results(args.out, "cost", data, markdown)
    log.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
