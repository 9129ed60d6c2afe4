"""`gradprobe` / `python -m gradprobe_dist`: a thin entry over the pipeline.

Every subcommand works as one plain process and under torchrun/srun (the process group is
joined from the launcher's environment); only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.sparsity=0.6")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradprobe", description="Gradient-probing pruner")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="probe and prune in stages, checkpointing each layer's mask")
    _config_args(p)
    _output_args(p)
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint in output_dir")
    p.add_argument("--eval", action="store_true", help="also report eval loss/perplexity before and after")

    p = sub.add_parser("sweep", help="one probe, every prune.thresholds value decided and evaluated")
    _config_args(p)
    _output_args(p)
    p.add_argument("--out", help="write the sweep results to this JSON file")

    p = sub.add_parser("validate", help="check a config without running anything")
    _config_args(p)

    p = sub.add_parser("make-shards", help="write webdataset calibration shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="text files to cut into token windows")
    src.add_argument("--bundled", choices=["train", "valid"], help="the bundled Shakespeare excerpt")
    src.add_argument("--inputs", help=".pt/.npy tensor of inputs (with --targets)")
    p.add_argument("--targets", help=".pt/.npy tensor of targets")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer directory (default: bytes)")
    p.add_argument("--max-samples", type=int)

    p = sub.add_parser("train", help="train the configured model on data.shards (one process)")
    _config_args(p)
    _output_args(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", required=True, help="where to save the weights (.safetensors)")

    p = sub.add_parser("inspect", help="per-layer table of a mask checkpoint")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="loss/perplexity or accuracy, optionally with a mask checkpoint applied")
    _config_args(p)
    _output_args(p)
    p.add_argument("--masks", help="mask checkpoint directory to apply first")

    p = sub.add_parser("export", help="apply a mask checkpoint and save the pruned model")
    _config_args(p)
    p.add_argument("--masks", required=True, help="mask checkpoint directory")
    p.add_argument("--out", required=True, help="output: a directory (hf) or a .safetensors file")
    p.add_argument("--torch-prune", action="store_true",
                   help="save weight_orig + weight_mask (torch.nn.utils.prune) instead of plain zeros")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        logging.getLogger("gradprobe_dist").setLevel(logging.WARNING)
    from . import commands

    try:
        result = getattr(commands, args.command.replace("-", "_"))(args)
    finally:
        from .distributed.env import destroy_distributed

        destroy_distributed()
    if result is not None and getattr(args, "json", False) and _is_main():
        print(json.dumps(result, indent=2, default=str))
    return 0


def _is_main() -> bool:
    from .log import is_main_process

    return is_main_process()


if __name__ == "__main__":
    sys.exit(main())
