"""Peak memory per rank of loading a model, whole against sharded, under ZeRO-3 and FSDP2.

A random-weight LLaMA (tied embeddings, as SmolLM2) is saved with ``save_pretrained`` and
loaded on 2 gloo ranks the way a run loads ``model.kind: hf``:

* whole: every rank builds the whole model (``build_model`` without a backend; transformers
  maps the file and reads a weight when it is first used), then partitions it with
  ``deepspeed.zero.Init(module=model)``, as ``deepspeed.initialize`` does first (what ZeRO-3
  did before sharded loading); FSDP2 shards it in ``prepare``;
* sharded: ``build_model(cfg, backend)``: the skeleton on the meta device, each rank reading
  only its part of the safetensors file.

Per rank it reports the process's peak RSS (Linux VmHWM, see ``bench.lib.memory``) once the
model is loaded (for ZeRO-3: partitioned) and once the backend is ready (the DeepSpeed
engine built with its fp32 master and gradient partitions; FSDP2 sharded),
above the peak the same process reached when it first loaded and prepared a tiny model the
same way (imports, process group, engine set-up: all but the weights). Each row is a fresh
launch.

    python -m bench.load_memory [--smoke] [--out bench/results]   (about 2 min on 2 busy cores)

Prints a table and writes ``load_memory.json`` and ``load_memory.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench.lib.memory import peak_rss_bytes  # noqa: E402
from bench.lib.ranks import run_ranks  # noqa: E402
from bench.lib.report import markdown_table, run_meta, write_report  # noqa: E402
from bench.scale import count_params, save_random_llama  # noqa: E402

MIB = 2**20
WORLD = 2
# about 22.6 M parameters, 86 MiB in fp32
LLAMA = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=16384)
SMOKE_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096)
# loaded first in every rank: the floor is what a model of no size costs
TINY_LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64)
ROWS = [("zero3", False), ("zero3", True), ("fsdp", False), ("fsdp", True)]


def _rank(rank: int, world: int, tiny: str, path: str, parallel: str, sharded: bool) -> dict:
    import gc

    from gradprobe_dist.runtime.memory import return_freed_memory

    _load(tiny, parallel, sharded)
    gc.collect()
    return_freed_memory()
    floor = peak_rss_bytes()
    return {"floor_bytes": floor, **_load(path, parallel, sharded)}


def _load(path: str, parallel: str, sharded: bool) -> dict:
    """Load ``path`` and prepare it for every prunable weight; the peaks at each step."""
    import torch

    from gradprobe_dist.parallel import build_backend
    from gradprobe_dist.pipeline.build import build_model
    from gradprobe_dist.pipeline.config import ModelConfig
    from gradprobe_dist.probe.params import find_prunable

    backend = build_backend(parallel, torch.device("cpu"))
    start = time.perf_counter()
    model = build_model(ModelConfig(kind="hf", path=path), backend if sharded else None)
    if parallel == "zero3" and not sharded:  # what deepspeed.initialize does first with a whole model
        import deepspeed

        from gradprobe_dist.parallel.zero3 import zero3_config

        deepspeed.zero.Init(module=model, config_dict_or_path=zero3_config(1))
    loaded_s, loaded_peak = time.perf_counter() - start, peak_rss_bytes()
    backend.prepare(model, list(find_prunable(model)))
    ready_s, ready_peak = time.perf_counter() - start, peak_rss_bytes()
    backend.close()
    return {"load_s": loaded_s, "ready_s": ready_s, "load_peak_bytes": loaded_peak, "ready_peak_bytes": ready_peak}


def measure(tiny: str, path: str, parallel: str, sharded: bool) -> dict:
    ranks = [r.value for r in run_ranks(_rank, WORLD, tiny, path, parallel, sharded, timeout=1200)]
    above = {key: [(r[f"{key}_peak_bytes"] - r["floor_bytes"]) / MIB for r in ranks] for key in ("load", "ready")}
    return {"parallel": parallel, "loading": "sharded" if sharded else "whole", "ranks": WORLD,
            "load_s": max(r["load_s"] for r in ranks), "ready_s": max(r["ready_s"] for r in ranks),
            "floor_mib_per_rank": [r["floor_bytes"] / MIB for r in ranks],
            "load_above_floor_mib_per_rank": above["load"], "ready_above_floor_mib_per_rank": above["ready"],
            "load_above_floor_mib": max(above["load"]), "ready_above_floor_mib": max(above["ready"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, ZeRO-3 rows only (checks the script runs)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    fields = SMOKE_LLAMA if args.smoke else LLAMA
    params = count_params(fields)
    model_mib = 4 * params / MIB
    rows = []
    with tempfile.TemporaryDirectory(prefix="load-memory-") as work:
        tiny, path = Path(work) / "tiny", Path(work) / "llama"
        save_random_llama(TINY_LLAMA, tiny)
        save_random_llama(fields, path)
        for parallel, sharded in ROWS[:2] if args.smoke else ROWS:
            rows.append(measure(str(tiny), str(path), parallel, sharded))
            row = rows[-1]
            print(f"# {parallel} {row['loading']}: load peak {row['load_above_floor_mib']:.0f} MiB/rank above the "
                  f"floor, {row['load_s']:.1f} s", flush=True)
    for row in rows:
        row["load_above_floor_over_model"] = row["load_above_floor_mib"] / model_mib
    table = markdown_table(rows, [
        ("parallel", "parallel", "s"), ("loading", "loading", "s"), ("ranks", "ranks", "d"),
        ("load_s", "load s", ".1f"), ("ready_s", "load + prepare s", ".1f"),
        ("load_above_floor_mib", "load peak above the floor (MiB/rank)", ".0f"),
        ("load_above_floor_over_model", "... / model size", ".2f"),
        ("ready_above_floor_mib", "peak after prepare above the floor (MiB/rank)", ".0f")])
    floor = max(f for row in rows for f in row["floor_mib_per_rank"])
    lines = [table, "", f"model: random-weight tied LLaMA {fields}, {params / 1e6:.1f} M parameters, "
                        f"{model_mib:.0f} MiB in fp32; {WORLD} gloo ranks, one thread each; floor (a tiny "
                        f"model loaded and prepared first) up to {floor:.0f} MiB/rank"]
    print("\n".join(lines))
    write_report(args.out, "load_memory", {"meta": run_meta(smoke=args.smoke), "model": fields, "params": params,
                                           "model_mib": model_mib, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
