"""Peak resident memory per rank of the whole main job (configs/smollm2.yaml: load, shard,
probe, checkpoint), as the kernel counts it, against the import-only floor:

* 1 process (parallel=none, micro-batch 2 x 2) against 2 FSDP2 ranks (micro-batch 2 each:
  the same global batches), both fp32: bar (2 ranks - floor) <= 0.6 x (1 process - floor);
* 2 FSDP2 ranks in bf16 against fp32: bar (bf16 - floor) <= 0.6 x (fp32 - floor); and how
  often their masks agree.

``python -m bench.main_memory [--num-batches N]`` (the model must have been fetched, and the
shards written, by scripts/run_main.sh); prints a table, writes bench/results/main_memory.json.
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

CONFIG = "configs/smollm2.yaml"
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
    args = parser.parse_args()
    floor = bare_import_peak_rss(["torch", "transformers"]) / MIB
    runs = [("1 process, fp32", None, ["parallel=none", "data.micro_batch_size=4"], "one"),
            ("2 FSDP2 ranks, fp32", 2, [], "fp32"), ("2 FSDP2 ranks, bf16", 2, ["model.dtype=bfloat16"], "bf16")]
    with tempfile.TemporaryDirectory(prefix="main-memory-") as out, ThreadPoolExecutor(len(runs)) as pool:
        # side by side: a peak is per process and does not depend on the others; wall times do
        rows = list(pool.map(lambda r: run(r[0], r[1], r[2], args.num_batches, f"{out}/{r[3]}"), runs))
        same_masks = agreement(f"{out}/fp32", f"{out}/bf16")
    for row in rows:
        row["above_floor_mib"] = row["peak_rss_mib_per_rank"] - floor
    one, fsdp, bf16 = (row["above_floor_mib"] for row in rows)
    ratios = {"fsdp2_ranks_vs_1_process": fsdp / one, "bf16_vs_fp32_per_rank": bf16 / fsdp,
              "bf16_fp32_mask_agreement": same_masks}
    table = markdown_table(rows + [{"run": "bare import (torch + transformers)", "peak_rss_mib_per_rank": floor}],
                           [("run", "run", "s"), ("ranks", "ranks", "d"), ("wall_s", "wall s (runs side by side)", ".0f"),
                            ("peak_rss_mib_per_rank", "peak RSS per rank (MiB)", ".0f"),
                            ("above_floor_mib", "above the import floor (MiB)", ".0f")])
    lines = [table, "", f"2 FSDP2 ranks / 1 process, above the floor: {ratios['fsdp2_ranks_vs_1_process']:.2f} "
                        f"(bar <= {BAR})",
             f"bf16 / fp32 per rank, above the floor: {ratios['bf16_vs_fp32_per_rank']:.2f} (bar <= {BAR})",
             f"bf16 and fp32 masks decide alike on {100 * same_masks:.2f}% of the prunable weights",
             f"settings: {CONFIG}, prune.num_batches={args.num_batches}"]
    print("\n".join(lines))
    write_report("bench/results", "main_memory", {"meta": run_meta(), "rows": rows, "import_floor_mib": floor,
                                                  "ratios": ratios, "num_batches": args.num_batches},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
