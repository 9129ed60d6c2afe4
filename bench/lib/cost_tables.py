"""The cost benchmark's Markdown: one table per section of ``bench.cost``'s report, each
with the sentence that says what was measured and how."""
from __future__ import annotations

from bench.lib.report import describe_machine, markdown_table

SECONDS = "0.3f"
RATIO = "0.3f"


def md_header(meta: dict) -> list[str]:
    return [f"# Cost benchmark{' (smoke run: sizes too small for conclusions)' if meta['smoke'] else ''}",
            "",
            f"`{meta['command']}` on {describe_machine(meta['machine'])}, deepspeed "
            f"{meta['machine']['deepspeed']}; 1-min load average {meta['load_average_1m_at_end']:.2f} at the "
            f"end. Sparsity {meta['sparsity']}, reduction factor {meta['reduction_factor']}, statistic max_abs. "
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
        out += ["", f"Breakdown of one probe, {row['workload']}: forward timed in the loss callable, "
                "backward in a `LocalBackend` subclass, selection in a strategy wrapper; the rest is "
                "the probe's own work (statistic fold, finite checks, scaling, restoring, preparing):", "",
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
                ("sweep_wall", "sweep (s)", SECONDS), ("sweep_eval_wall", "its evals (s)", SECONDS),
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
            "second pass), summed from the tensors' sizes. `peak RSS`: whole process (VmHWM) up to "
            "the end of its timed probes, including building the full model before sharding. `probe RSS growth`: "
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


def flatten_for_tables(results: dict) -> None:
    """Add the scalar columns the tables print (the JSON keeps the nested values too)."""
    for row in results.get("probe_vs_floor", []):
        row["floor_wall"], row["probe_wall"] = row["floor_s"]["wall"], row["probe_s"]["wall"]
    if "sweep" in results:
        sw = results["sweep"]
        for part in ("sweep", "sweep_eval"):
            sw[f"{part}_wall"] = sw[f"{part}_s"]["wall"]
        sw["separate_wall"] = sw["separate_prunes_s"]["wall"] + sw["separate_eval_s"]["wall"]
