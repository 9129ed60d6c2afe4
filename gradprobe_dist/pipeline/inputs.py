"""The job's calibration input: what one rank reads (``read_calibration``) and what a resume
must match besides the model: the mask-changing config fields, the world size (it decides
how calibration samples form the global batches) and the calibration shards as their
``metadata.json`` describes them (a re-written shard set resumes nothing)."""
from __future__ import annotations

import hashlib
import json

from gradprobe_dist.data.loader import read_shard_set, shard_batches
from gradprobe_dist.pipeline.config import RunConfig


def read_calibration(cfg: RunConfig, *, rank: int = 0, world_size: int = 1,
                     vocab_size: int | None = None) -> list:
    """This rank's calibration micro-batches: the probe's ``prune.num_batches``, then the
    guard's ``prune.guard_batches`` (with ``prune.guard``); too few samples is an error naming both fields."""
    p = cfg.prune
    try:
        return shard_batches(cfg.data.shards, micro_batch_size=cfg.data.micro_batch_size,
                             num_batches=p.num_batches + p.held_out_batches, rank=rank,
                             world_size=world_size, vocab_size=vocab_size)
    except ValueError as err:
        if not p.held_out_batches or "needs micro_batch_size*num_batches" not in str(err):
            raise
        raise ValueError(f"{err} (prune.num_batches={p.num_batches} + prune.guard_batches="
                         f"{p.guard_batches}: lower either)") from None


def shards_summary(shards) -> dict:
    """Count, samples and a sha256 of what ``metadata.json`` records of each shard (name,
    sample count, byte size and the shard's own sha256 where recorded)."""
    shard_set = read_shard_set(shards)
    described = [shard_set.kind, [[p.name, n, b, h] for p, n, b, h in zip(
        shard_set.paths, shard_set.num_samples, shard_set.num_bytes, shard_set.sha256)]]
    digest = hashlib.sha256(json.dumps(described).encode()).hexdigest()
    return {"shards": len(shard_set.paths), "samples": sum(shard_set.num_samples), "sha256": digest[:16]}


def mask_config(cfg: RunConfig, world_size: int) -> dict:
    """The config a mask checkpoint records (its hash is the run's one config hash)."""
    return {**cfg.mask_fields(), "world_size": world_size,
            "data.shards_metadata": shards_summary(cfg.data.shards)}
