"""The subcommands behind the CLI; each returns a JSON-able result (printed with --json).

Commands that need every rank (prune, sweep, eval) join the launcher's process group and run
through ``PruneJob``; the others (make-shards, train, validate, inspect, export) do their
work on rank 0 only, so they also run unchanged under torchrun. Human-readable output goes
to stdout on rank 0 unless --json asks for the JSON result alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path

from gradprobe_dist.checkpoint import MaskCheckpoint, apply_masks, load_masks
from gradprobe_dist.pipeline.config import ConfigError, RunConfig, dump_config, load_config
from gradprobe_dist.runtime.env import init_distributed
from gradprobe_dist.runtime.log import get_logger, is_main_process

log = get_logger(__name__)


def _job(args: argparse.Namespace):
    from gradprobe_dist.pipeline.job import PruneJob

    cfg = _config_with_weights(args)
    env = init_distributed(device=None if cfg.device == "auto" else cfg.device)
    return PruneJob(cfg, env, show_progress=not args.quiet), cfg, env


def _config_with_weights(args: argparse.Namespace) -> RunConfig:
    """The config of a command that works on the model's weights (prune, sweep, eval,
    export): an unset model.path would silently give it a random model."""
    cfg = load_config(args.config, args.overrides)
    if cfg.model.kind != "hf" and not cfg.model.path and not cfg.model.random_init:
        raise ConfigError(f"model.path is not set, so `{args.command}` would work on a randomly "
                          f"initialised {cfg.model.kind} model: set model.path to its weights (e.g. "
                          "from `gradprobe train --out PATH`), or model.random_init=true if a "
                          "random model is what you want (tests, smoke runs)")
    return cfg


def _say(args: argparse.Namespace, text: str) -> None:
    """Human output: rank 0 only, and not when --json wants stdout to be JSON."""
    if is_main_process() and not args.json:
        print(text, flush=True)


def prune(args):
    job, cfg, env = _job(args)
    check_output_dir(cfg)
    with job:
        before = job.evaluate() if args.eval else None
        result = job.run(restart=args.restart, redo_from_stage=args.redo_from_stage)
        after = job.evaluate() if args.eval or args.eval_after else None
    _say(args, format_table(result.rows))
    for r in result.rounds:
        _say(args, f"round {r['round']}/{cfg.prune.rounds}: sparsity {100 * r['sparsity']:.2f}% (schedule "
                   f"{100 * r['schedule']:.2f}%) in {r['directory']}{' (resumed)' if r['resumed'] else ''}")
    _say(args, f"sparsity over prunable weights: {100 * result.sparsity:.2f}% (target "
               f"{100 * cfg.prune.sparsity:.0f}%); {len(result.layers_written)} layers written, "
               f"{result.stages_resumed}/{result.stages} stages resumed from {cfg.output_dir}; "
               f"{result.seconds:.1f} s on {env.world_size} rank(s)")
    if before is not None:
        _say(args, eval_line("before pruning", before))
    if after is not None:
        _say(args, eval_line("after pruning ", after))
    return {"sparsity": result.sparsity, "layers": result.rows, "layers_written": result.layers_written,
            "stages": result.stages, "stages_resumed": result.stages_resumed, "rounds": result.rounds,
            "seconds": result.seconds, "world_size": env.world_size,
            "eval_before": before, "eval_after": after}


def sweep(args):
    if args.out:
        check_new_output(args.out, args.overwrite, "--out")
    job, cfg, _ = _job(args)
    if not cfg.data.eval_shards:
        raise ConfigError("sweep evaluates every threshold, but data.eval_shards is not set: point "
                          "it at evaluation shards (`gradprobe make-shards --bundled valid --out DIR`)")
    with job:
        results = job.sweep(show_progress=not args.quiet)
    lines = ["threshold  sparsity  weights_pruned  metric"]
    for t, s, n, m in zip(results["thresholds"], results["sparsities"], results["weights_pruned"],
                          results["metrics"]):
        lines.append(f"{t:9.3f}  {100 * s:7.2f}%  {n:14d}  {metrics_text(m)}")
    _say(args, "\n".join(lines))
    if args.out and is_main_process():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def validate(args):
    """Parse and check the config and what it points at (weights, shards), plan the stages
    of a built-in model; nothing is probed or written."""
    cfg = _config_with_weights(args)
    inputs = check_inputs(cfg)
    stages = plan_stages_of(cfg)
    if not is_main_process():
        return None
    _say(args, dump_config(cfg).rstrip())
    for line in inputs:
        _say(args, f"# {line}")
    if stages is not None:
        for i, stage in enumerate(stages):
            _say(args, f"# stage {i + 1}/{len(stages)}: {len(stage)} layers ({stage[0]} ... {stage[-1]})")
    if cfg.prune.rounds > 1:
        from gradprobe_dist.pipeline.rounds import schedule_values

        values = schedule_values(cfg.prune.sparsity, cfg.prune.rounds, cfg.prune.schedule)
        _say(args, f"# {cfg.prune.rounds} rounds ({cfg.prune.schedule}), sparsity after each: "
                   + ", ".join(f"{100 * v:.2f}%" for v in values))
    digest = config_hash_of(cfg)
    _say(args, f"# config OK; config hash {digest[:16]} (a checkpoint's config_hash at world size "
               f"{world_size()})")
    return {"config": dataclasses.asdict(cfg), "config_hash": digest, "stages": stages}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def config_hash_of(cfg: RunConfig) -> str:
    """The one config hash: what a checkpoint of this run records as ``config_hash``."""
    from gradprobe_dist.checkpoint import config_hash
    from gradprobe_dist.pipeline.inputs import mask_config

    return config_hash(mask_config(cfg, world_size()))


def check_inputs(cfg: RunConfig) -> list[str]:
    """What prune would read, read now (weights, calibration and evaluation samples, as one
    rank would): a missing, unreadable or mismatched input fails validate, not a later run."""
    from gradprobe_dist.data.loader import shard_batches
    from gradprobe_dist.pipeline.inputs import read_calibration

    lines, vocab_size = [], _vocab_size_of(cfg)
    if cfg.model.path:
        lines.append(f"model.path {cfg.model.path}: loads" + (f" (vocabulary {vocab_size})" if vocab_size else ""))
    data, checked = cfg.data, "samples read and checked (one rank's share)"
    if data.shards:
        read_calibration(cfg, vocab_size=vocab_size)
        lines.append(f"data.shards {data.shards}: {cfg.prune.num_batches + cfg.prune.held_out_batches} "
                     f"batches of {data.micro_batch_size} {checked}")
    if data.eval_shards:
        shard_batches(data.eval_shards, micro_batch_size=data.eval_batch_size, num_batches=data.eval_batches,
                      vocab_size=vocab_size)
        lines.append(f"data.eval_shards {data.eval_shards}: {data.eval_batches} batches of "
                     f"{data.eval_batch_size} {checked}")
    check_output_dir(cfg)
    return lines


def check_output_dir(cfg: RunConfig) -> None:
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"output_dir {cfg.output_dir} is a file: name a directory for the mask checkpoint")


def _vocab_size_of(cfg: RunConfig) -> int | None:
    """The token vocabulary of the configured model, its weights loaded (a built-in model)
    or its config.json read (a Hugging Face directory, which stays unloaded)."""
    if cfg.model.kind == "hf":
        config = Path(cfg.model.path) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"model.path {cfg.model.path} holds no config.json: point it at "
                                    "a directory saved with save_pretrained()")
        try:
            return json.loads(config.read_text()).get("vocab_size")
        except ValueError as err:
            raise ValueError(f"{config} is not valid JSON ({err}); re-save the model") from None
    from gradprobe_dist.data.loader import token_vocab_size
    from gradprobe_dist.pipeline.build import build_model

    return token_vocab_size(build_model(cfg.model))


def check_new_output(path: str | Path, overwrite: bool, option: str) -> None:
    """Refuse to replace an existing file unless --overwrite; a directory is never a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory: name a file")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {path} already exists: choose another path, or pass --overwrite "
                         "to replace it")


def plan_stages_of(cfg: RunConfig) -> list[list[str]] | None:
    """The stage plan, from a weightless copy of a built-in model (None for hf models, whose
    layout is only known once they load)."""
    if cfg.model.kind == "hf":
        return None
    import torch

    from gradprobe_dist.pipeline.build import build_model
    from gradprobe_dist.probe.params import find_prunable
    from gradprobe_dist.pipeline.stages import plan_stages

    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, path=None))
    names = list(find_prunable(model, cfg.model.include, cfg.model.exclude, cfg.model.extra_prunable))
    return plan_stages(model, names, cfg.prune.stage_size, cfg.prune.stages)


def make_shards(args):
    from gradprobe_dist.data.shards import bundled_text_path, write_tensor_shards, write_text_shards

    if not is_main_process():
        return None
    if args.inputs:
        if not args.targets:
            raise ValueError("--inputs needs --targets (a .pt/.npy tensor of the same length)")
        paths = write_tensor_shards(args.inputs, args.targets, args.out,
                                    samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
    else:
        if args.targets:
            raise ValueError("--targets goes with --inputs (tensor data); text shards need none")
        files = [bundled_text_path(args.bundled)] if args.bundled else args.text
        paths = write_text_shards(files, args.out, seq_len=args.seq_len,
                                  samples_per_shard=args.samples_per_shard,
                                  tokenizer=args.tokenizer, max_samples=args.max_samples,
                                  overwrite=args.overwrite)
    _say(args, f"wrote {len(paths)} shards to {args.out}")
    return {"shards": [str(p) for p in paths]}


def train(args):
    """Train on rank 0 (the demo's model is small); other ranks have nothing to do."""
    import torch

    from gradprobe_dist.pipeline.build import build_model, save_weights
    from gradprobe_dist.pipeline.train import train_model

    cfg = load_config(args.config, args.overrides)
    if cfg.model.kind == "hf":
        raise ConfigError("train builds a built-in model (model.kind tinygpt or mlp), not a Hugging "
                          "Face one: fine-tune that with transformers, then prune it")
    if args.steps < 1 or not args.lr > 0:
        raise ValueError(f"--steps={args.steps} must be >= 1 and --lr={args.lr} > 0")
    check_new_output(args.out, args.overwrite, "--out")
    if not is_main_process():
        return None
    torch.manual_seed(cfg.seed)
    model = build_model(dataclasses.replace(cfg.model, path=None))  # model.path is the output
    stats = train_model(model, cfg.data.shards, steps=args.steps, micro_batch_size=cfg.data.micro_batch_size,
                        lr=args.lr, seed=cfg.seed, show_progress=not args.quiet)
    save_weights(model, args.out)
    _say(args, f"trained {args.steps} steps in {stats['seconds']:.0f} s (last loss "
               f"{stats['final_train_loss']:.3f}); saved {args.out}")
    return {**stats, "out": args.out}


def inspect(args):
    if not is_main_process():
        return None
    ckpt = MaskCheckpoint.read(args.directory)
    ckpt.completed()  # every layer file checked against its sha256
    if not args.allow_partial:
        ckpt.check_complete()
    rows = ckpt.summary_rows()
    _say(args, format_table(rows))
    pruned, numel = sum(r["pruned"] for r in rows), sum(math.prod(r["shape"]) for r in rows)
    _say(args, f"{len(rows)} layers (checksums verified), {pruned}/{numel} weights pruned "
               f"({100 * pruned / numel if numel else 0:.2f}%)")
    return rows


def eval(args):  # noqa: A001 - the subcommand's name
    job, _, _ = _job(args)
    with job:
        if args.masks:
            store = job.read_checkpoint(args.masks, allow_partial=args.allow_partial)
            job.apply_checkpoint(store, store.completed)
        metrics = job.evaluate()
    _say(args, eval_line("masks " + (args.masks or "none"), metrics))
    return metrics


def export(args):
    """Apply a mask checkpoint to the configured model on rank 0 and save it (see
    ``pipeline/export.py``: never onto its sources, a non-empty target only with --overwrite)."""
    from gradprobe_dist.pipeline import export as exporting
    from gradprobe_dist.pipeline.build import save_weights
    from gradprobe_dist.masking import to_torch_prune
    from gradprobe_dist.pipeline.job import apply_saved_weights, build_configured_model

    cfg = _config_with_weights(args)
    if not is_main_process():
        return None
    exporting.check_target(args.out, {"model.path": cfg.model.path, "--masks": args.masks}, args.overwrite)
    model = build_configured_model(cfg)
    masks = apply_masks(model, load_masks(args.masks))
    apply_saved_weights(model, MaskCheckpoint.read(args.masks))  # SparseGPT's / reconstruction's updates
    if args.torch_prune:
        to_torch_prune(model, masks)
    if cfg.model.kind == "hf":
        exporting.write_hf(model, cfg.model.path, masks, args.out)
    elif args.torch_prune:
        import torch

        exporting.write_file(lambda path: torch.save(model.state_dict(), path), args.out)
    else:
        exporting.write_file(lambda path: save_weights(model, path), args.out)
    _say(args, f"saved the pruned model ({len(masks)} masked weights) to {args.out}")
    return {"out": args.out, "masked": len(masks)}


def fetch_model(args):
    """Rank 0 converts the model (once; a complete directory is reused)."""
    from gradprobe_dist.models.fetch import fetch_model as fetch

    if not is_main_process():
        return None
    result = fetch(args.name, args.out)
    _say(args, f"{args.name}: {'already in' if result['cached'] else 'converted into'} {args.out}"
               + ("" if result["cached"] else f" in {result['seconds']:.0f} s"))
    return result


def format_table(rows: list[dict]) -> str:
    header = f"{'layer':40s} {'shape':>14s} {'tentative':>10s} {'pruned':>9s} {'restored':>9s} {'sparsity':>9s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name'][:40]:40s} {shape:>14s} {r['tentative']:>10d} {r['pruned']:>9d} "
                     f"{r['restored']:>9d} {100 * r['sparsity']:>8.2f}%")
    return "\n".join(lines)


def eval_line(label: str, metrics: dict) -> str:
    return f"{label}: {metrics_text(metrics)}"


def metrics_text(metrics: dict) -> str:
    if "perplexity" in metrics:
        return (f"eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f} "
                f"({metrics['tokens']} tokens)")
    return f"accuracy {metrics['accuracy']:.4f} ({metrics['samples']} samples)"


def plot(args):
    from gradprobe_dist.pipeline.plots import plot_checkpoint

    if not args.max_threshold > 0:
        raise ValueError(f"--max-threshold={args.max_threshold} must be > 0, e.g. 0.5")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: name a directory for the PNG files")
    paths = plot_checkpoint(args.directory, args.out, allow_partial=args.allow_partial,
                            thresholds=[args.max_threshold * i / 100 for i in range(101)])
    if not args.json:
        print("\n".join(map(str, paths)))
    return {"files": [str(p) for p in paths]}
