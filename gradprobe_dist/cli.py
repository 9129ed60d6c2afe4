"""`gradprobe` / `python -m gradprobe_dist`: a thin entry over the pipeline.

Every subcommand works as one plain process and under torchrun/srun (the process group is
joined from the launcher's environment); only rank 0 prints and writes. A mistake in the
input (config, paths, a checkpoint that does not fit, bad arguments) ends with one
``[rank N] ERROR`` line and exit status 2, not a traceback (``GRADPROBE_LOG_LEVEL=DEBUG``
adds the traceback). Under torchrun every error also goes to torchelastic's error file, so
the launcher's failure summary names it even when only rank 0's output is shown; for a
handled error that is the one line, and the other ranks report theirs a moment later, so
that rank 0's line comes first and is the summary's root cause.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from gradprobe_dist.runtime.log import get_logger, is_main_process
from gradprobe_dist.runtime.memory import follow_live_memory

EXIT_USAGE = 2
#: input problems: reported as one ERROR line (anything else is a bug and keeps its traceback)
HANDLED = (ValueError, TypeError, OSError, ImportError, FloatingPointError)
#: how long a rank other than 0 waits before reporting a handled error (see the docstring)
OTHER_RANKS_DELAY_S = 0.5


class Parser(argparse.ArgumentParser):
    """Argument errors as one ``[rank N] ERROR`` line with exit status 2, like every other
    input problem (argparse's default prints the whole usage text first)."""

    def error(self, message: str):
        report(f"{message}; see `{self.prog} --help`")
        self.exit(EXIT_USAGE)


def report(message: str) -> None:
    """Log a handled error and record it (without a traceback) for torchrun's summary."""
    if not is_main_process():
        time.sleep(OTHER_RANKS_DELAY_S)
    get_logger().error("%s", " ".join(message.split()))  # one line, whatever the message held
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun only
    if error_file:
        record = {"message": message, "extraInfo": {"py_callstack": message,
                                                    "timestamp": str(int(time.time()))}}
        with open(error_file, "w") as f:
            json.dump({"message": record}, f)


def error_text(err: BaseException) -> str:
    """An OSError names its file and the system's reason; our own errors carry a sentence."""
    if isinstance(err, OSError) and err.filename is not None:
        return (f"{err.filename}: {err.strerror or err}; check that the path exists, has the "
                "right kind (file or directory) and that you may read or write it")
    return str(err)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. prune.sparsity=0.6")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--json", action="store_true", help="print only the result, as JSON, on stdout")


def _partial_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-partial", action="store_true",
                   help="accept a checkpoint whose prune has not finished (missing layers stay dense)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gradprobe", description="Gradient-probing pruner")
    # the deepspeed launcher inserts --local_rank=N; the rank comes from the environment anyway
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("prune", help="probe and prune in stages, checkpointing each layer's mask")
    _config_args(p)
    _output_args(p)
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint in output_dir")
    p.add_argument("--redo-from-stage", type=int, metavar="S",
                   help="recompute stage S (1-based) and every later one, keeping the earlier stages")
    p.add_argument("--eval", action="store_true", help="also report eval loss/perplexity before and after")
    p.add_argument("--eval-after", action="store_true",
                   help="report eval loss/perplexity after pruning only (a comparison run whose dense "
                        "model another run evaluated already)")

    p = sub.add_parser("sweep", help="one probe, every prune.thresholds value decided and evaluated")
    _config_args(p)
    _output_args(p)
    p.add_argument("--out", help="write the sweep results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("validate", help="check a config and the inputs it names, plan its stages; runs nothing")
    _config_args(p)
    _output_args(p)

    p = sub.add_parser("make-shards", help="write webdataset calibration shards")
    _output_args(p)
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
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")

    p = sub.add_parser("train", help="train the configured model on data.shards (on rank 0)")
    _config_args(p)
    _output_args(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", required=True, help="where to save the weights (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("inspect", help="per-layer table of a mask checkpoint (checksums verified)")
    p.add_argument("directory")
    _partial_arg(p)
    _output_args(p)

    p = sub.add_parser("eval", help="loss/perplexity or accuracy, optionally with a mask checkpoint applied")
    _config_args(p)
    _output_args(p)
    p.add_argument("--masks", help="mask checkpoint directory to apply first (any world size wrote it)")
    _partial_arg(p)

    p = sub.add_parser("export", help="apply a mask checkpoint and save the pruned model")
    _config_args(p)
    _output_args(p)
    p.add_argument("--masks", required=True, help="mask checkpoint directory")
    p.add_argument("--out", required=True, help="output: a directory (hf) or a .safetensors file")
    p.add_argument("--torch-prune", action="store_true",
                   help="save weight_orig + weight_mask (torch.nn.utils.prune) instead of plain zeros")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never the source model)")

    p = sub.add_parser("fetch-model", help="convert a known pretrained model into a Hugging Face directory (cached)")
    p.add_argument("name", help="model name, e.g. smollm2-135m")
    p.add_argument("--out", required=True, help="directory to write (kept and reused once complete)")
    _output_args(p)

    p = sub.add_parser("plot", help="PNGs of a mask checkpoint: per-layer sparsity, gradient ratios, threshold curve")
    p.add_argument("directory", help="mask checkpoint (prune output_dir, or an iterative round-NNN)")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--max-threshold", type=float, default=1.0, help="threshold curve from 0 to this")
    _partial_arg(p)
    _output_args(p)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may stand between options
    (``prune --config c.yaml --restart a=1 --quiet b=2``), as users of launch scripts write."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or an argument error already reported
        return done.code
    follow_live_memory()
    logger = get_logger()
    level = logger.level
    if args.quiet:
        logger.setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed functions torch has deprecated, once per collective
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    from gradprobe_dist.pipeline import commands
    from gradprobe_dist.runtime.env import destroy_distributed
    from gradprobe_dist.checkpoint.relay import MainRankFailed

    try:
        result = getattr(commands, args.command.replace("-", "_"))(args)
    except (*HANDLED, MainRankFailed) as err:
        logger.debug("traceback of the error below", exc_info=True)
        report(error_text(err))
        return EXIT_USAGE  # no process-group teardown: another rank may be stuck mid-collective
    except Exception as err:
        ErrorHandler().record_exception(err)
        raise
    finally:
        logger.setLevel(level)
    destroy_distributed()
    if args.json and result is not None and is_main_process():
        print(json.dumps(result, indent=2, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
