"""Peak resident memory per rank of the whole main job's prune (configs/smollm2-50.yaml:
load, shard, probe, SparseGPT with the veto and the guard, checkpoint), as the kernel counts
it, against the import-only floor:

* 1 process (parallel=none, micro-batch 2 x the config's) against 2 FSDP2 ranks (the
  config's micro-batch each: the same global batches), both fp32: bar (2 ranks - floor) <= 0.6 x (1 process - floor);
* 2 FSDP2 ranks in bf16 against fp32: bar (bf16 - floor) <= 0.6 x (fp32 - floor); and how
  often their masks agree.

``python -m bench.main_memory [--num-batches N] [--zero3]`` (the model must have been fetched,
and the shards written, by scripts/run_main.sh); prints a table, writes
bench/results/main_memory.json. ``--zero3`` adds 2 ZeRO-3 ranks in fp32 (the same global
batches as the FSDP2 runs), loaded sharded like them, to the table.
Fewer calibration batches than the main job's 8 keep it short: the peak is one batch's
activations plus the model, its shards and the probe's per-weight state, not their number.
"""
from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor

from bench.lib.memory import bare_import_peak_rss
from bench.lib.ranks import torchrun_module
from bench.lib.report import markdown_table, run_meta, write_report
from gradprobe_dist.pipeline.config import load_config

CONFIG = "configs/smollm2-50.yaml"
BAR = 0.6
MIB = 2**20


def run(name: str, nproc: int | None, overrides: list[str], num_batches: int, out: str) -> dict:
    result = torchrun_module("gradprobe_dist", ["prune", "--config", CONFIG, "--quiet", "--restart",
                                                f"output_dir={out}", f"prune.num_batches={num_batches}",
                                                *overrides], nproc, timeout=3000)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.output[-3000:]}")
    peaks = [r["peak_rss_bytes"] for r in result.ranks]
    return {"run": name, "ranks": len(peaks), "wall_s": result.wall_s, "peak_rss_mib_per_rank": max(peaks) / MIB,
            "peaks_mib": [p / MIB for p in peaks]}


def agreement(a: str, b: str) -> float:
    """Fraction of prunable weights on which two mask checkpoints decide alike."""
    from gradprobe_dist.checkpoint.store import load_masks

    first, second = load_masks(a), load_masks(b)
    same = sum(int((first[n] == second[n]).sum()) for n in first)
    return same / sum(m.numel() for m in first.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--zero3", action="store_true", help="add a row for 2 ZeRO-3 ranks (fp32)")
    args = parser.parse_args()
    floor = bare_import_peak_rss(["torch", "transformers"]) / MIB
    global_batch = 2 * load_config(CONFIG, []).data.micro_batch_size  # what 2 ranks read per step
    runs = [("1 process, fp32", None, ["parallel=none", f"data.micro_batch_size={global_batch}"], "one"),
            ("2 FSDP2 ranks, fp32", 2, [], "fp32"), ("2 FSDP2 ranks, bf16", 2, ["model.dtype=bfloat16"], "bf16")]
    runs += [("2 ZeRO-3 ranks, fp32", 2, ["parallel=zero3"], "zero3")] if args.zero3 else []
    with tempfile.TemporaryDirectory(prefix="main-memory-") as out, ThreadPoolExecutor(len(runs)) as pool:
        # side by side: a peak is per process and does not depend on the others; wall times do
        rows = list(pool.map(lambda r: run(r[0], r[1], r[2], args.num_batches, f"{out}/{r[3]}"), runs))
        same_masks = agreement(f"{out}/fp32", f"{out}/bf16")
    # the ZeRO-3 ranks also import deepspeed
    floors = {"one": floor, "fp32": floor, "bf16": floor}
    if args.zero3:
        floors["zero3"] = bare_import_peak_rss(["torch", "transformers", "deepspeed"]) / MIB
    for row, (*_, tag) in zip(rows, runs):
        row["above_floor_mib"] = row["peak_rss_mib_per_rank"] - floors[tag]
    one, fsdp, bf16 = (row["above_floor_mib"] for row in rows[:3])
    ratios = {"fsdp2_ranks_vs_1_process": fsdp / one, "bf16_vs_fp32_per_rank": bf16 / fsdp,
              "bf16_fp32_mask_agreement": same_masks}
    if args.zero3:
        ratios["zero3_ranks_vs_1_process"] = rows[3]["above_floor_mib"] / one
    bare = [{"run": "bare import (torch + transformers)", "peak_rss_mib_per_rank": floor}]
    bare += [{"run": "bare import (+ deepspeed)", "peak_rss_mib_per_rank": floors["zero3"]}] if args.zero3 else []
    table = markdown_table(rows + bare,
                           [("run", "run", "s"), ("ranks", "ranks", "d"), ("wall_s", "wall s (runs side by side)", ".0f"),
                            ("peak_rss_mib_per_rank", "peak RSS per rank (MiB)", ".0f"),
                            ("above_floor_mib", "above the import floor (MiB)", ".0f")])
    lines = [table, "", f"2 FSDP2 ranks / 1 process, above the floor: {ratios['fsdp2_ranks_vs_1_process']:.3f} "
                        f"(bar <= {BAR})",
             f"bf16 / fp32 per rank, above the floor: {ratios['bf16_vs_fp32_per_rank']:.3f} (bar <= {BAR})",
             *([f"2 ZeRO-3 ranks / 1 process, above the floor: {ratios['zero3_ranks_vs_1_process']:.3f}"]
               if args.zero3 else []),
             f"bf16 and fp32 masks decide alike on {100 * same_masks:.2f}% of the prunable weights",
             f"settings: {CONFIG}, prune.num_batches={args.num_batches}"]
    print("\n".join(lines))
    write_report("bench/results", "main_memory", {"meta": run_meta(), "rows": rows, "import_floor_mib": floor,
                                                  "import_floors_mib": floors,
                                                  "ratios": ratios, "num_batches": args.num_batches},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
