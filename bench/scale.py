"""Scaling benchmark: the staged prune job on LLaMA models of growing size, 1 and 2 ranks.

For each LLaMA config (built from config with random weights and saved, then loaded the
way a run loads ``model.kind: hf``), parallel mode, rank count and stage count, real gloo
ranks run the pipeline's ``PruneJob`` (Wanda, threshold 0, the prefix cache on) and then
time one forward+backward per calibration batch with every prunable weight probed:

* probe time: the job's own per-stage probe+decide time (mask writes excluded), and the
  whole job's wall time;
* the two-pass floor: 2 x num_batches x one forward+backward, in the same processes; the
  ratio probe / floor is the bar (one stage: <= 1.05);
* time per token: probe seconds / calibration tokens (one global batch is the same
  ``--batch`` x ``--seq`` tokens at every rank count);
* peak RSS per rank of the whole process at the end of the job (Linux VmHWM, see
  ``bench.lib.memory``), and the import-only floor of a bare process to subtract.

Least-squares fits over the measured points say how time per token and memory per rank grow
with the parameter count. ``--smollm2`` adds SmolLM2-135M itself, fetched with the project's
own ``fetch-model`` command (skipped, and said so, where the command does not exist).

    python -m bench.scale [--smoke] [--out bench/results] [--smollm2 | --only-smollm2] [--smollm2-dir DIR]

Prints the Markdown tables and writes ``scale.json`` and ``scale.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.lib.memory import bare_import_peak_rss, peak_rss_bytes  # noqa: E402
from bench.lib.ranks import run_ranks  # noqa: E402
from bench.lib.report import markdown_table, run_meta, write_report  # noqa: E402

MIB = 2**20
# name: (LlamaConfig fields, stage_size for 3 stages); 135m is SmolLM2-135M's architecture
SIZES = {
    "llama-10m": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=12, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=8192), 4),
    "llama-35m": (dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=18, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=16384), 6),
    "llama-135m": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0), 10),
    "smoke-a": (dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512), 1),
    "smoke-b": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512), 1),
}
# launches of (parallel, ranks, [(size, stages)]), cheapest first; the report is rewritten after
# each, so a run cut short keeps what it measured. Sized for a 2-core machine: 135 M runs 3
# stages in one process only.
PLAN = [
    ("none", 1, [(size, stages) for size in ("llama-10m", "llama-35m") for stages in (1, 3)]),
    ("fsdp", 2, [(size, stages) for size in ("llama-10m", "llama-35m") for stages in (1, 3)]),
    ("zero3", 2, [("llama-10m", 1), ("llama-10m", 3), ("llama-35m", 1)]),
    ("none", 1, [("llama-135m", 1), ("llama-135m", 3)]),
    ("fsdp", 2, [("llama-135m", 1)]),
    ("zero3", 2, [("llama-135m", 1)]),
]
SMOKE_PLAN = [("none", 1, [(size, stages) for size in ("smoke-a", "smoke-b") for stages in (1, 3)])]


# -- runs on real ranks -------------------------------------------------------------------------
def _rank(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """Each run's prune job as the CLI runs it, then its forward+backward floor, one after
    another in these processes (importing torch + transformers costs tens of seconds on a
    loaded machine). Freed memory goes back to the kernel and the peak-RSS counter restarts
    before each run, so each run's peak is its own (on top of what the process holds)."""
    import gc

    from bench.lib.memory import current_rss_bytes, reset_peak_rss
    from gradprobe_dist.runtime.memory import return_freed_memory

    return_freed_memory()
    results = []
    for overrides in runs:
        gc.collect()
        return_freed_memory()
        # the peak so far is read before the counter restarts, or the process's peak would be lost
        results.append({"rss_before_bytes": current_rss_bytes(), "peak_before_bytes": peak_rss_bytes(),
                        "peak_reset": reset_peak_rss(), **_one_run(overrides)})
        if rank == 0:  # progress while the launch runs
            print(f"# [rank 0] done: {overrides[1].rsplit('/', 1)[-1]} {overrides[-4]} {overrides[-3]}: probe "
                  f"{results[-1]['probe_s']:.1f} s", flush=True)
    return results


def _one_run(overrides: list[str]) -> dict:
    from gradprobe_dist.checkpoint.store import MaskCheckpoint
    from gradprobe_dist.pipeline.config import load_config
    from gradprobe_dist.pipeline.job import PruneJob, loss_fn_for
    from gradprobe_dist.probe.batches import make_loss_of_batch, to_device
    from gradprobe_dist.runtime.env import init_distributed

    cfg = load_config(None, overrides)
    env = init_distributed(device="cpu")
    job = PruneJob(cfg, env, show_progress=False)
    batches = job.calibration
    job.backend.prepare(job.model, job.names)  # sharding / the ZeRO-3 engine: built once, not timed
    job.backend.release()
    start = time.perf_counter()
    job.run(restart=True)
    job_s = time.perf_counter() - start
    peak_job = peak_rss_bytes()
    probe_s = None
    if env.is_main:
        ckpt = MaskCheckpoint.read(cfg.output_dir)
        probe_s = sum(ckpt.layer_info(n)["seconds"] for n in ckpt.completed())
    loss_of = make_loss_of_batch(loss_fn_for(batches), None)
    wrapped = job.backend.prepare(job.model, job.names)  # every prunable weight gets a gradient
    job.model.eval()
    steps = []
    for batch in batches:
        started = time.perf_counter()
        job.backend.backward(loss_of(wrapped, to_device(batch, job.backend.device)))
        job.backend.zero_grad()
        steps.append(time.perf_counter() - started)
    job.backend.release()
    job.close()
    return {"job_s": job_s, "probe_s": probe_s, "fwd_bwd_s": steps, "peak_job_bytes": peak_job}


def run_group(parallel: str, world: int, specs: list[tuple[str, int]], args, work: Path, shards: str) -> list[dict]:
    """Every (size, stages) of ``specs`` on one launch of ``world`` ranks."""
    runs = []
    for size, stages in specs:
        fields, stage_size = SIZES[size]
        model_dir = work / size
        if not model_dir.exists():
            save_random_llama(fields, model_dir)
        runs.append(["model.kind=hf", f"model.path={model_dir}", f"data.shards={shards}",
                     f"data.micro_batch_size={args.batch // world}", f"prune.num_batches={args.batches}",
                     "prune.strategy=wanda", "prune.sparsity=0.5", "prune.gradient_threshold=0.0",
                     f"prune.stage_size={stage_size if stages > 1 else 0}", f"parallel={parallel}",
                     f"output_dir={work / f'masks-{size}-{parallel}-{world}-{stages}'}", "device=cpu"])
    started = time.perf_counter()
    ranks = run_ranks(_rank, world, runs, timeout=3600, env={"DS_ACCELERATOR": "cpu"})
    print(f"# {parallel} x{world}: {len(runs)} runs in {time.perf_counter() - started:.0f} s "
          "(process start included)", flush=True)
    tokens = args.batches * args.batch * args.seq
    rows = []
    for index, (size, stages) in enumerate(specs):
        per_rank = [r.value[index] for r in ranks]
        main = per_rank[0]
        floor_s = 2 * sum(main["fwd_bwd_s"])  # two passes over the same batches
        rows.append({
            "model": size, "params": count_params(SIZES[size][0]), "parallel": parallel, "ranks": world,
            "stages": stages, "tokens": tokens, "job_s": main["job_s"], "probe_s": main["probe_s"],
            "floor_s": floor_s, "probe_over_floor": main["probe_s"] / floor_s,
            "probe_us_per_token": 1e6 * main["probe_s"] / tokens,
            "fwd_bwd_us_per_token": 1e6 * sum(main["fwd_bwd_s"]) / tokens,
            "peak_rss_mib_per_rank": [r["peak_job_bytes"] / MIB for r in per_rank],
            "rss_before_mib_per_rank": [r["rss_before_bytes"] / MIB for r in per_rank],
            "peak_counter_reset": all(r["peak_reset"] for r in per_rank),
        })
        row = rows[-1]
        print(f"# {size} {parallel} x{world}, {stages} stage(s): probe {row['probe_s']:.2f} s, floor "
              f"{row['floor_s']:.2f} s, ratio {row['probe_over_floor']:.3f}, peak RSS "
              f"{max(row['peak_rss_mib_per_rank']):.0f} MiB/rank", flush=True)
    # the whole process: its last window (read at exit) and every window before a restart
    rows_exit = [max([r.peak_rss_bytes] + [v["peak_before_bytes"] for v in r.value]) / MIB for r in ranks]
    for row in rows:
        row["process_peak_rss_mib_per_rank"] = rows_exit
    return rows


def save_random_llama(fields: dict, directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=True,
                                      bos_token_id=0, eos_token_id=0, **fields)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def count_params(fields: dict) -> int:
    """Parameters of the tied LlamaForCausalLM a size builds (counted from its shapes)."""
    h, i, n, heads, kv, v = (fields[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "vocab_size"))
    kv_dim = h // heads * kv
    block = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h
    return v * h + n * block + h


def fetch_smollm2(target: Path) -> Path | None:
    """SmolLM2-135M through the project's own command, into ``target``; None (with the reason
    printed) where the command is missing or fails."""
    proc = subprocess.run([sys.executable, "-m", "gradprobe_dist.cli", "fetch-model", "smollm2-135m",
                           "--out", str(target)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f"# SmolLM2 skipped: `gradprobe fetch-model smollm2-135m` failed or does not exist "
              f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
        return None
    return target


# -- fits -------------------------------------------------------------------------------------
def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept of y = a x + b over the points."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return slope, my - slope * mx


def fits(rows: list[dict], bare_mib: float) -> list[dict]:
    """Per (parallel, ranks, stages): time per token ~ c P^k (log-log), and peak RSS per rank
    above the import floor ~ m P + m0."""
    out = []
    groups = sorted({(r["parallel"], r["ranks"], r["stages"]) for r in rows})
    for parallel, world, stages in groups:
        points = sorted((r for r in rows if (r["parallel"], r["ranks"], r["stages"]) == (parallel, world, stages)
                         and r["model"] != "smollm2-135m"), key=lambda r: r["params"])
        if len(points) < 2:
            continue
        exponent, log_c = least_squares([math.log(r["params"]) for r in points],
                                        [math.log(r["probe_us_per_token"]) for r in points])
        mem_slope, mem_0 = least_squares([r["params"] for r in points],
                                         [max(r["peak_rss_mib_per_rank"]) - bare_mib for r in points])
        out.append({"parallel": parallel, "ranks": world, "stages": stages, "points": len(points),
                    "time_exponent": exponent, "us_per_token_at_8b": math.exp(log_c) * 8e9 ** exponent,
                    "rss_bytes_per_param": mem_slope * MIB, "rss_mib_at_zero": mem_0,
                    "rss_gib_at_8b": (mem_slope * 8e9 + mem_0) / 1024})
    return out


def stage_cost(rows: list[dict]) -> list[dict]:
    """3 stages against 1 stage, same model, mode and ranks."""
    one = {(r["model"], r["parallel"], r["ranks"]): r for r in rows if r["stages"] == 1}
    return [{"model": r["model"], "parallel": r["parallel"], "ranks": r["ranks"],
             "time_3_over_1": r["probe_s"] / one[key]["probe_s"],
             "rss_3_over_1": max(r["peak_rss_mib_per_rank"]) / max(one[key]["peak_rss_mib_per_rank"])}
            for r in rows if r["stages"] == 3 and (key := (r["model"], r["parallel"], r["ranks"])) in one]


# -- report -------------------------------------------------------------------------------------
def render(rows: list[dict], fitted: list[dict], staged: list[dict], bare_mib: float, args) -> str:
    table = markdown_table([{**r, "rss": " / ".join(f"{m:.0f}" for m in r["peak_rss_mib_per_rank"]),
                             "mparams": r["params"] / 1e6} for r in rows], [
        ("model", "model", "s"), ("mparams", "M params", ".1f"), ("parallel", "parallel", "s"),
        ("ranks", "ranks", "d"), ("stages", "stages", "d"), ("job_s", "job (s)", ".1f"),
        ("probe_s", "probe (s)", ".2f"), ("floor_s", "2-pass floor (s)", ".2f"),
        ("probe_over_floor", "probe / floor", ".3f"), ("probe_us_per_token", "probe us/token", ".0f"),
        ("rss", "peak RSS per rank (MiB)", "s")])
    fit_table = markdown_table(fitted, [
        ("parallel", "parallel", "s"), ("ranks", "ranks", "d"), ("stages", "stages", "d"),
        ("points", "points", "d"), ("time_exponent", "time/token ~ P^k: k", ".2f"),
        ("rss_bytes_per_param", "RSS/rank: bytes per param", ".1f"), ("rss_mib_at_zero", "RSS/rank at P=0 (MiB)", ".0f"),
        ("us_per_token_at_8b", "extrapolated: us/token at 8 B", ".0f"),
        ("rss_gib_at_8b", "extrapolated: RSS/rank at 8 B (GiB)", ".1f")])
    stage_table = markdown_table(staged, [
        ("model", "model", "s"), ("parallel", "parallel", "s"), ("ranks", "ranks", "d"),
        ("time_3_over_1", "probe time 3 stages / 1", ".2f"), ("rss_3_over_1", "peak RSS 3 stages / 1", ".2f")])
    return (f"## Scale: {args.batches} calibration batches of {args.batch} x {args.seq} tokens, Wanda, "
            f"random-weight LLaMA configs\n\n{table}\n\n"
            f"A bare process importing torch + transformers peaks at {bare_mib:.0f} MiB.\n\n"
            f"## Stage cost (3 stages against 1)\n\n{stage_table}\n\n"
            f"## Least-squares fits over the sizes\n\n{fit_table}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny config at 1 and 2 ranks: checks the script runs")
    parser.add_argument("--out", default="bench/results", help="directory for scale.json and scale.md")
    parser.add_argument("--batches", type=int, default=2, help="calibration batches per pass")
    parser.add_argument("--batch", type=int, default=2, help="sequences per global batch (split over ranks)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M, via `gradprobe fetch-model`")
    parser.add_argument("--only-smollm2", action="store_true", help="SmolLM2-135M alone, no random-weight sizes")
    parser.add_argument("--smollm2-dir", type=Path, help="where `fetch-model` keeps SmolLM2 (reused when finished; "
                                                         "default: a temporary directory)")
    args = parser.parse_args()
    args.smollm2 = args.smollm2 or args.only_smollm2
    if args.smoke:
        args.batches, args.seq = 2, 16
    plan = SMOKE_PLAN if args.smoke else [] if args.only_smollm2 else PLAN
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        shards = make_shards(work, args)
        bare_mib = bare_import_peak_rss(["torch", "transformers"]) / MIB
        meta = run_meta(smoke=args.smoke, batches=args.batches, batch=args.batch, seq=args.seq,
                        bare_import_mib=bare_mib)
        rows = []
        for parallel, world, specs in plan:
            rows += run_group(parallel, world, specs, args, work, shards)
            report(rows, bare_mib, meta, args, final=False)
        if args.smollm2 and not args.smoke:
            path = fetch_smollm2(args.smollm2_dir or work / "smollm2-135m")
            if path is not None:
                rows += run_smollm2(path, args, work, shards)
    report(rows, bare_mib, meta, args, final=True)
    return 0


def report(rows: list[dict], bare_mib: float, meta: dict, args, final: bool) -> None:
    """Write scale.json and scale.md from the rows so far; print the tables at the end."""
    fitted, staged = fits(rows, bare_mib), stage_cost(rows)
    markdown = render(rows, fitted, staged, bare_mib, args)
    write_report(args.out, "scale", {"meta": {**meta, "complete": final}, "rows": rows, "fits": fitted,
                                     "stage_cost": staged}, markdown)
    if final:
        print(markdown)


def run_smollm2(path: Path, args, work: Path, shards: str) -> list[dict]:
    """SmolLM2-135M (fetched into ``path``) at 1 rank and 2 FSDP ranks, 1 and 3 stages."""
    SIZES["smollm2-135m"] = SIZES["llama-135m"]  # the same architecture
    return [row for parallel, world in (("none", 1), ("fsdp", 2))
            for row in run_group(parallel, world, [("smollm2-135m", 1), ("smollm2-135m", 3)], args, work, shards)]


def make_shards(work: Path, args) -> str:
    """Byte-level text windows of the bundled excerpt, enough for every rank count."""
    from gradprobe_dist.data.shards import bundled_text_path, write_text_shards

    out = work / "calib"
    write_text_shards([bundled_text_path("train")], out, seq_len=args.seq, samples_per_shard=1,
                      max_samples=args.batches * args.batch)
    return str(out)


if __name__ == "__main__":
    sys.exit(main())
