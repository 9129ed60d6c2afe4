"""The subcommands behind the CLI; each returns a JSON-able result (printed with --json)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import MaskCheckpoint, apply_masks, load_masks
from .config import dump_config, load_config
from .distributed.env import init_distributed
from .log import get_logger

log = get_logger(__name__)


def _job(args: argparse.Namespace):
    from .pipeline import PruneJob

    cfg = load_config(args.config, args.overrides)
    env = init_distributed(device=None if cfg.device == "auto" else cfg.device)
    return PruneJob(cfg, env, show_progress=not getattr(args, "quiet", False)), cfg, env


def prune(args):
    job, cfg, env = _job(args)
    before = job.evaluate(cfg.data.eval_shards, cfg.data.eval_batches) if args.eval else None
    result = job.run(restart=args.restart)
    after = job.evaluate(cfg.data.eval_shards, cfg.data.eval_batches) if args.eval else None
    if env.is_main and not args.json:
        print(format_table(result.rows))
        print(f"sparsity over prunable weights: {100 * result.sparsity:.2f}% (target "
              f"{100 * cfg.prune.sparsity:.0f}%); {len(result.layers_written)} layers written, "
              f"{result.stages_skipped}/{result.stages} stages resumed from {cfg.output_dir}; "
              f"{result.seconds:.1f} s on {env.world_size} rank(s), parallel={cfg.parallel}")
        if before is not None:
            print(_eval_line("before pruning", before))
            print(_eval_line("after pruning ", after))
    return {"sparsity": result.sparsity, "layers": result.rows, "layers_written": result.layers_written,
            "stages": result.stages, "stages_resumed": result.stages_skipped,
            "seconds": result.seconds, "eval_before": before, "eval_after": after}


def sweep(args):
    import json

    from .evaluate import evaluate
    from .probe import GradProbe
    from .strategies import build_strategy

    job, cfg, env = _job(args)
    from .data.loader import calibration_batches

    eval_batches = calibration_batches(cfg.data.eval_shards, micro_batch_size=cfg.data.micro_batch_size,
                                       num_batches=cfg.data.eval_batches, rank=env.rank,
                                       world_size=env.world_size)
    probe = GradProbe(job.model, build_strategy(cfg.prune.strategy, **cfg.prune.strategy_options),
                      backend=job.backend, statistic=cfg.prune.statistic, include=job.names)
    results = probe.sweep_gradient_thresholds(
        job.batches, None, lambda model: evaluate(probe._wrapped, eval_batches, job.backend),
        sparsity=cfg.prune.sparsity, thresholds=cfg.prune.thresholds,
        num_batches=cfg.prune.num_batches, verbose=not args.quiet,
        reduction_factor=cfg.prune.reduction_factor)
    if env.is_main:
        if not args.json:
            print("threshold  sparsity  weights_pruned  metric")
            for t, s, n, m in zip(results["thresholds"], results["sparsities"],
                                  results["weights_pruned"], results["metrics"]):
                print(f"{t:9.3f}  {100 * s:7.2f}%  {n:14d}  {m}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def validate(args):
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    print(f"# config OK; mask fingerprint {cfg.fingerprint()[:16]}")


def make_shards(args):
    from .data.shards import bundled_text_path, write_tensor_shards, write_text_shards

    env = init_distributed(device="cpu")
    if not env.is_main:
        return None
    if args.inputs:
        if not args.targets:
            raise ValueError("--inputs needs --targets (a .pt/.npy tensor of the same length)")
        paths = write_tensor_shards(args.inputs, args.targets, args.out,
                                    samples_per_shard=args.samples_per_shard)
    else:
        files = [bundled_text_path(args.bundled)] if args.bundled else args.text
        paths = write_text_shards(files, args.out, seq_len=args.seq_len,
                                  samples_per_shard=args.samples_per_shard,
                                  tokenizer=args.tokenizer, max_samples=args.max_samples)
    print(f"wrote {len(paths)} shards to {args.out}")
    return {"shards": [str(p) for p in paths]}


def train(args):
    from .factory import build_model, save_weights
    from .train import train_model

    cfg = load_config(args.config, args.overrides)
    env = init_distributed(device="cpu")
    if not env.is_main:
        return None
    import torch

    import dataclasses

    torch.manual_seed(cfg.seed)
    model = build_model(dataclasses.replace(cfg.model, path=None))  # model.path is the output
    stats = train_model(model, cfg.data.shards, steps=args.steps, micro_batch_size=cfg.data.micro_batch_size,
                        lr=args.lr, seed=cfg.seed, show_progress=not args.quiet)
    save_weights(model, args.out)
    if not args.json:
        print(f"trained {args.steps} steps in {stats['seconds']:.0f} s (last loss "
              f"{stats['final_train_loss']:.3f}); saved {args.out}")
    return stats


def inspect(args):
    rows = MaskCheckpoint.read(args.directory).summary_rows()
    if not args.json:
        print(format_table(rows))
    return rows


def eval(args):  # noqa: A001 - the subcommand's name
    job, cfg, env = _job(args)
    if args.masks:
        ckpt = job.on_main(lambda: MaskCheckpoint.read(args.masks))
        names = job.backend.broadcast_object(ckpt.completed() if ckpt is not None else None)
        job.apply_checkpoint(ckpt, names)
    metrics = job.evaluate(cfg.data.eval_shards, cfg.data.eval_batches)
    if env.is_main and not args.json:
        print(_eval_line("masks " + (args.masks or "none"), metrics))
    return metrics


def export(args):
    from .factory import build_model, save_weights
    from .masking import to_torch_prune

    cfg = load_config(args.config, args.overrides)
    env = init_distributed(device="cpu")
    if not env.is_main:
        return None
    model = build_model(cfg.model)
    masks = apply_masks(model, load_masks(args.masks))
    if args.torch_prune:
        to_torch_prune(model, masks)
    if cfg.model.kind == "hf":
        model.save_pretrained(args.out, safe_serialization=True)
    elif args.torch_prune:
        import torch

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.out)
    else:
        save_weights(model, args.out)
    print(f"saved the pruned model ({len(masks)} masked weights) to {args.out}")
    return {"out": args.out, "masked": len(masks)}


def format_table(rows: list[dict]) -> str:
    header = f"{'layer':40s} {'shape':>14s} {'tentative':>10s} {'pruned':>9s} {'restored':>9s} {'sparsity':>9s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name'][:40]:40s} {shape:>14s} {r['tentative']:>10d} {r['pruned']:>9d} "
                     f"{r['restored']:>9d} {100 * r['sparsity']:>8.2f}%")
    return "\n".join(lines)


def _eval_line(label: str, metrics: dict) -> str:
    if "perplexity" in metrics:
        return f"{label}: eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.3f} ({metrics['tokens']} tokens)"
    return f"{label}: accuracy {metrics['accuracy']:.4f} ({metrics['samples']} samples)"
