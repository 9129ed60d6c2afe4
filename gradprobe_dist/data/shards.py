"""Write calibration data as webdataset tar shards plus a ``metadata.json`` manifest.

Shards let every rank read only its own files (shard i goes to rank i % world_size), and the
manifest records per-shard sample counts, byte sizes and sha256 digests so the loader can
refuse an impossible or damaged set-up before any model runs (``torch.load`` checks no CRC:
a flipped byte inside a sample would otherwise load as a wrong token id). Existing shards
are never overwritten unless asked (``overwrite=True``). Each sample is one ``.pth`` tensor per
field (``input_ids`` for text; ``inputs`` and ``targets`` for tensor data), saved with
``torch.save`` and read back with ``weights_only=True``, so any torch dtype round-trips.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from gradprobe_dist.probe.validation import is_int
from gradprobe_dist.runtime.log import get_logger

METADATA_FILE = "metadata.json"
BYTE_VOCAB_SIZE = 256
FIELDS = {"text": ("input_ids",), "tensor": ("inputs", "targets")}
_BUNDLED_DIR = Path(__file__).parent / "bundled"
_BUNDLED_TEXTS = {"train": "shakespeare_excerpt.txt", "valid": "shakespeare_valid_excerpt.txt"}

logger = get_logger(__name__)


def bundled_text_path(split: str = "train") -> Path:
    """The bundled Shakespeare excerpt: ``train`` for calibration, ``valid`` for evaluation."""
    if split not in _BUNDLED_TEXTS:
        raise ValueError(f"unknown bundled text split {split!r}; use one of {sorted(_BUNDLED_TEXTS)}")
    return _BUNDLED_DIR / _BUNDLED_TEXTS[split]


def load_tensor(path: str | Path) -> torch.Tensor:
    """Load one tensor from a ``.pt``/``.pth`` (torch.save) or ``.npy`` file, without unpickling code."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth", ".npy"):
        raise ValueError(f"cannot load a tensor from {path}: expected a .pt, .pth or .npy file")
    if not path.is_file():
        raise ValueError(f"tensor file {path} does not exist (or is not a file); check the path")
    try:
        if path.suffix == ".npy":
            tensor = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is not a readable {path.suffix} tensor file ({_one_line(err)}); "
                         "save one tensor with torch.save or numpy.save") from None
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{path} holds a {type(tensor).__name__}, not a tensor; save one tensor per file")
    return tensor


def write_text_shards(
    text_files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seq_len: int,
    samples_per_shard: int,
    tokenizer: str | None = None,
    max_samples: int | None = None,
    prefix: str = "calib",
    overwrite: bool = False,
) -> list[Path]:
    """Tokenise the concatenated files and shard non-overlapping ``seq_len`` windows in file order.

    Byte-level by default (token id = byte value); ``tokenizer`` names a local Hugging Face
    tokenizer directory. Labels are not stored: causal LMs take ``labels = input_ids``.
    """
    check_positive(seq_len=seq_len, samples_per_shard=samples_per_shard)
    if max_samples is not None:
        check_positive(max_samples=max_samples)
    if not text_files:
        raise ValueError("text_files is empty; pass at least one text file, e.g. bundled_text_path()")
    ids, vocab_size = _tokenize([Path(f) for f in text_files], tokenizer)
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                         f"add text or lower seq_len")
    if max_samples is not None:
        num_windows = min(num_windows, max_samples)
    windows = ids[: num_windows * seq_len].view(num_windows, seq_len)
    metadata = {
        "kind": "text",
        "tokenizer": "bytes" if tokenizer is None else str(tokenizer),
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "sources": [str(f) for f in text_files],
    }
    samples = ({"input_ids": window} for window in windows)
    return _write_shards(samples, num_windows, Path(out_dir), samples_per_shard, prefix, metadata, overwrite)


def write_tensor_shards(
    inputs: torch.Tensor | str | Path,
    targets: torch.Tensor | str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int,
    prefix: str = "calib",
    overwrite: bool = False,
) -> list[Path]:
    """Shard (input, target) pairs for non-text models: sample i is row i of each tensor."""
    check_positive(samples_per_shard=samples_per_shard)
    sources = [str(x) for x in (inputs, targets) if not isinstance(x, torch.Tensor)]
    inputs = inputs if isinstance(inputs, torch.Tensor) else load_tensor(inputs)
    targets = targets if isinstance(targets, torch.Tensor) else load_tensor(targets)
    if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets):
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the "
                         f"same first dimension (one row per sample)")
    if len(inputs) == 0:
        raise ValueError("inputs and targets have no rows; pass at least one sample")
    metadata = {
        "kind": "tensor",
        "tokenizer": None,
        "vocab_size": None,
        "seq_len": None,
        "sources": sources,
        "input_shape": list(inputs.shape[1:]),
        "input_dtype": str(inputs.dtype),
        "target_shape": list(targets.shape[1:]),
        "target_dtype": str(targets.dtype),
    }
    samples = ({"inputs": x, "targets": y} for x, y in zip(inputs, targets))
    return _write_shards(samples, len(inputs), Path(out_dir), samples_per_shard, prefix, metadata, overwrite)


def _tokenize(files: list[Path], tokenizer: str | None) -> tuple[torch.Tensor, int]:
    """Token ids (int64, 1-D) of the concatenated files, and the vocabulary size."""
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"text files not found: {missing}; check the paths")
    if tokenizer is None:
        data = bytearray(b"".join(f.read_bytes() for f in files))
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64), BYTE_VOCAB_SIZE
    from transformers import AutoTokenizer  # optional dependency, only for this branch

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as err:
        raise ValueError(f"tokenizer {tokenizer} cannot be loaded ({_one_line(err)[:300]}); pass a "
                         "local directory saved with tokenizer.save_pretrained()") from None
    try:
        text = "".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as err:
        raise ValueError(f"a text file is not UTF-8 ({err.reason} at byte {err.start}); convert it, "
                         "or drop --tokenizer to cut raw bytes") from None
    ids = hf_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64), len(hf_tokenizer)


def _write_shards(
    samples: Iterator[dict[str, torch.Tensor]],
    num_samples: int,
    out_dir: Path,
    samples_per_shard: int,
    prefix: str,
    metadata: dict,
    overwrite: bool,
) -> list[Path]:
    """Write samples with ``wds.ShardWriter`` and record the manifest the loader validates against."""
    _make_room(out_dir, overwrite)
    written: list[str] = []
    # mtime=0 makes the tar bytes a pure function of the samples (reproducible shards).
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=samples_per_shard,
                         maxsize=float("inf"), post=written.append, verbose=0,
                         encoder=False, mtime=0) as writer:
        for index, sample in enumerate(samples):
            fields = {f"{name}.pth": _tensor_bytes(tensor) for name, tensor in sample.items()}
            writer.write({"__key__": f"{index:09d}", **fields})
    paths = [Path(name) for name in written]
    counts = [min(samples_per_shard, num_samples - i * samples_per_shard) for i in range(len(paths))]
    metadata["num_samples"] = num_samples
    metadata["shards"] = [{"name": p.name, "num_samples": n, "num_bytes": p.stat().st_size,
                           "sha256": file_sha256(p)} for p, n in zip(paths, counts)]
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("wrote %d %s samples in %d shards to %s", num_samples, metadata["kind"], len(paths), out_dir)
    return paths


def _make_room(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; shards already there are refused, or with ``overwrite`` the ones
    its manifest lists are removed first (so no stale shard outlives the new manifest)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory; choose another output directory")
    manifest = out_dir / METADATA_FILE
    existing = sorted(p.name for p in out_dir.glob("*.tar")) if out_dir.is_dir() else []
    if not overwrite and (manifest.exists() or existing):
        raise ValueError(f"{out_dir} already holds shards ({METADATA_FILE if manifest.exists() else existing[0]}); "
                         "choose another directory, or pass --overwrite (overwrite=True) to replace them")
    if overwrite and manifest.is_file():
        try:
            listed = [entry["name"] for entry in json.loads(manifest.read_text())["shards"]]
        except (ValueError, KeyError, TypeError):
            listed = []
        for name in listed:
            (out_dir / Path(name).name).unlink(missing_ok=True)
        manifest.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """``torch.save`` bytes of one sample; clone so a row view does not drag its whole storage along."""
    buffer = io.BytesIO()
    torch.save(tensor.clone(), buffer)
    return buffer.getvalue()


def check_positive(**values: int) -> None:
    """Reject non-int or < 1 sizes up front, naming the argument."""
    for name, value in values.items():
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
