"""Read micro-batches (calibration, evaluation or training data) from webdataset shards, one disjoint shard subset per rank.

Shard i goes to rank i % world_size (as ``wds.split_by_node`` does), but rank and world size
are passed in, so reading works before or without ``torch.distributed``. Global batch t is the
rank-ordered union of every rank's micro-batch t.

Everything that can be checked from ``metadata.json`` is checked for all ranks, so every rank
raises the same error instead of one rank failing while the others wait in a collective.
Given the model's vocabulary size, token ids are checked before any model sees them, and an
id out of range names its shard and sample (not ``IndexError`` deep inside an embedding).
"""
from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
import pickle
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import webdataset as wds

from gradprobe_dist.data.shards import FIELDS, METADATA_FILE, check_positive
from gradprobe_dist.runtime.log import get_logger

Batch = dict[str, torch.Tensor] | tuple[torch.Tensor, ...]
ShardSource = str | Path | Sequence[str | Path]

logger = get_logger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """The shards to read, in manifest order, with what ``metadata.json`` says about each."""

    kind: str
    paths: list[Path]
    num_samples: list[int]
    num_bytes: list[int]
    #: per shard; None for shards written before digests were recorded
    sha256: list[str | None]
    #: text shards: the tokenizer's vocabulary size and name
    vocab_size: int | None = None
    tokenizer: str | None = None


def shard_batches(
    shard_dir_or_urls: ShardSource,
    *,
    micro_batch_size: int,
    num_batches: int,
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int | None = None,
) -> list[Batch]:
    """Exactly ``num_batches`` micro-batches of ``micro_batch_size`` samples from this rank's shards.

    Text batches are ``{"input_ids", "labels"}`` dicts of LongTensor[b, T] (labels equal the
    ids; the model shifts them); tensor batches are ``(inputs, targets)``. The order is fixed:
    this rank's shards in manifest order, samples in file order. ``vocab_size`` (a token
    model's, see ``token_vocab_size``) requires text shards whose ids all lie below it.
    """
    check_positive(micro_batch_size=micro_batch_size, num_batches=num_batches, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}; pass 0 <= rank < world_size")
    shards = read_shard_set(shard_dir_or_urls)
    needed = micro_batch_size * num_batches
    check_shard_plan(shards, needed, world_size)
    if vocab_size is not None:
        check_shards_fit_vocab(shards, vocab_size)
    to_read = _shards_needed_by_rank(shards, rank, world_size, needed)
    for index in to_read:
        _check_tar(shards.paths[index], shards.num_samples[index], shards.sha256[index])
    logger.debug("reading %d samples from shards %s", needed, [shards.paths[i].name for i in to_read])

    fields = FIELDS[shards.kind]
    dataset = wds.WebDataset(
        [str(p) for p in shards.paths],
        nodesplitter=partial(_split_by_rank, rank=rank, world_size=world_size),
        workersplitter=None,
        shardshuffle=False,
        empty_check=False,
    ).map(partial(_decode_sample, fields=fields))
    samples = list(itertools.islice(dataset, needed))
    if vocab_size is not None:
        _check_token_ids(samples, vocab_size)
    samples = [tensors for tensors, _ in samples]
    columns = [torch.stack(column).unflatten(0, (num_batches, micro_batch_size)) for column in zip(*samples)]
    if shards.kind == "text":
        return [{"input_ids": ids, "labels": ids.clone()} for ids in columns[0]]
    return list(zip(*columns))


def read_shard_set(source: ShardSource) -> ShardSet:
    """Resolve a shard directory, a brace pattern or a list of shard paths against ``metadata.json``.

    Every shard must sit in one directory with the manifest written by ``write_*_shards``.
    """
    directory, names = _directory_and_names(source)
    manifest_path = directory / METADATA_FILE
    if not manifest_path.is_file():
        found = sorted(p.name for p in directory.glob("*.tar")) if directory.is_dir() else []
        raise ValueError(f"no shards found: {manifest_path} does not exist"
                         + (f" ({len(found)} tar files there, e.g. {found[0]}, have no manifest)" if found else "")
                         + "; write shards with write_text_shards() or write_tensor_shards()")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = {entry["name"]: entry for entry in manifest["shards"]}
        for entry in entries.values():
            int(entry["num_samples"]), int(entry["num_bytes"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{manifest_path} is not a shard manifest written by make-shards "
                         f"({type(err).__name__}: {err}); re-write the shards") from None
    if manifest.get("kind") not in FIELDS:
        raise ValueError(f"{manifest_path} has kind {manifest.get('kind')!r}, expected one of "
                         f"{sorted(FIELDS)}; re-write the shards with this version of gradprobe_dist")
    names = list(entries) if names is None else names
    if not names:
        raise ValueError(f"no shards found: {manifest_path} lists no shards; re-write the shards")
    unlisted = [n for n in names if n not in entries]
    if unlisted:
        raise ValueError(f"shards {unlisted} are not listed in {manifest_path}; pass shards it lists "
                         f"or re-write the directory")
    missing = [str(directory / n) for n in names if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"shard files listed in {manifest_path} are missing: {missing}; restore them "
                         f"or re-write the shards")
    return ShardSet(
        kind=manifest["kind"],
        paths=[directory / n for n in names],
        num_samples=[entries[n]["num_samples"] for n in names],
        num_bytes=[entries[n]["num_bytes"] for n in names],
        sha256=[entries[n].get("sha256") for n in names],
        vocab_size=manifest.get("vocab_size"),
        tokenizer=manifest.get("tokenizer"),
    )


def _directory_and_names(source: ShardSource) -> tuple[Path, list[str] | None]:
    """The manifest's directory and the chosen shard names (None: every shard it lists)."""
    if isinstance(source, (str, Path)) and not str(source).endswith(".tar"):
        return Path(source), None
    urls = wds.shardlists.expand_urls(str(source)) if isinstance(source, (str, Path)) else list(source)
    if not urls:
        raise ValueError("no shards found: the shard list is empty; pass a shard directory or tar paths")
    directories = {Path(u).parent for u in urls}
    if len(directories) != 1:
        raise ValueError(f"shards come from several directories {sorted(map(str, directories))}; "
                         f"pass shards of one directory (one metadata.json)")
    return directories.pop(), [Path(u).name for u in urls]


def check_shard_plan(shards: ShardSet, samples_per_rank: int, world_size: int) -> None:
    """Fail before any compute if some rank would get no shard, too few samples, or a resized shard."""
    if len(shards.paths) < world_size:
        raise ValueError(f"{len(shards.paths)} shards for {world_size} ranks; write at least {world_size} "
                         f"shards, e.g. lower samples_per_shard")
    for path, expected in zip(shards.paths, shards.num_bytes):
        actual = path.stat().st_size
        if actual != expected:
            raise ValueError(f"shard {path} is {actual} bytes but metadata.json records {expected}: it is "
                             f"truncated or was replaced; re-write the shards")
    available = [sum(shards.num_samples[rank::world_size]) for rank in range(world_size)]
    short = {rank: n for rank, n in enumerate(available) if n < samples_per_rank}
    if short:
        details = ", ".join(f"rank {rank} has {n}" for rank, n in short.items())
        raise ValueError(f"{details} samples in its shards but needs micro_batch_size*num_batches = "
                         f"{samples_per_rank}; lower num_batches or micro_batch_size, or write more samples")


def token_vocab_size(model: nn.Module) -> int | None:
    """How many token ids the model's input embedding takes (None: not a token model)."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if embedding is None else embedding.num_embeddings


def check_shards_fit_vocab(shards: ShardSet, vocab_size: int) -> None:
    """A token model needs text shards whose tokenizer emits only ids it can embed."""
    where = shards.paths[0].parent
    if shards.kind != "text":
        raise ValueError(f"the shards in {where} hold {shards.kind} samples, but the model takes token "
                         "ids: write text shards (make-shards --text/--bundled), or configure a "
                         "model for (inputs, targets) data")
    if shards.vocab_size is not None and shards.vocab_size > vocab_size:
        raise ValueError(f"the shards in {where} were tokenised with {shards.tokenizer!r} (vocabulary "
                         f"{shards.vocab_size}), but the model's vocabulary has {vocab_size} tokens: "
                         "write the shards with the model's tokenizer (make-shards --tokenizer), or "
                         f"set the model's vocabulary to at least {shards.vocab_size}")


def _check_token_ids(samples: list, vocab_size: int) -> None:
    """Name the first sample whose ids the embedding cannot look up."""
    for (ids, *_), (url, key) in samples:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"sample {key} of shard {url} holds {ids.dtype} values, not token ids; "
                             "re-write the shards")
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            raise ValueError(f"sample {key} of shard {url} holds token id {int(ids[bad][0])}, outside "
                             f"the model's vocabulary 0..{vocab_size - 1}: the shard is corrupt or was "
                             "written with another tokenizer; re-write the shards with the model's tokenizer")


def _shards_needed_by_rank(shards: ShardSet, rank: int, world_size: int, needed: int) -> list[int]:
    """Indices of this rank's shards, in order, up to the first one that completes ``needed`` samples."""
    own = list(range(rank, len(shards.paths), world_size))
    totals = list(itertools.accumulate(shards.num_samples[i] for i in own))
    return own[: bisect.bisect_left(totals, needed) + 1]


def _check_tar(path: Path, expected_samples: int, sha256: str | None) -> None:
    """Read the whole tar once so a corrupt shard is named here, not as a decode error mid-run;
    its digest catches what the tar format cannot (a changed byte inside a sample)."""
    try:
        data = path.read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            keys = {member.name.split(".", 1)[0] for member in tar if member.isreg()}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"shard {path} is truncated or corrupt ({err}); re-write the shards") from err
    if len(keys) != expected_samples:
        raise ValueError(f"shard {path} holds {len(keys)} samples but metadata.json records "
                         f"{expected_samples}: it is truncated or corrupt; re-write the shards")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"shard {path} is truncated or corrupt: its sha256 differs from the one "
                         "metadata.json records; re-write the shards")


def _split_by_rank(shard_urls: Iterable[dict], *, rank: int, world_size: int) -> Iterator[dict]:
    """Shard i goes to rank i % world_size, like ``wds.split_by_node`` but with explicit rank."""
    return itertools.islice(shard_urls, rank, None, world_size)


def _decode_sample(sample: dict, *, fields: tuple[str, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[str, str]]:
    """Tensors of one sample and where it came from (shard, key); ``weights_only=True`` so a
    shard cannot run pickled code."""
    where = (sample.get("__url__"), sample.get("__key__"))
    try:
        tensors = tuple(torch.load(io.BytesIO(sample[f"{name}.pth"]), weights_only=True) for name in fields)
    except (KeyError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"sample {where[1]} of shard {where[0]} cannot be decoded ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); the shard is corrupt: re-write the shards") from None
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"sample {where[1]} of shard {where[0]} holds no tensor; re-write the shards")
    return tensors, where
