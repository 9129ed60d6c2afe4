"""Per-layer mask checkpoint: each layer's mask is saved the moment it is decided, so a
killed job resumes where it stopped instead of re-probing the whole model.

Layout of a checkpoint directory::

    manifest.json                 what is done, for which model and which config
    layers/<name>.safetensors     one mask per weight, 1 bit per element (+ optional tensors)

Crash safety: every file is written to a temporary file in the same directory, fsynced,
``os.replace``d over its target, and the directory is fsynced. The layer file goes first
and the manifest last, so the manifest only ever lists layers whose files are complete;
a crash at any point leaves the previous manifest valid.

Masks are keyed by *parameter* name (``model.named_parameters()`` of the unwrapped model,
e.g. ``"h.0.attn.c_attn.weight"``); True means pruned.

This class is rank-agnostic: it writes whenever asked. In a distributed run only the main
rank may create, save into or restart a checkpoint; other ranks may read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from gradprobe_dist.runtime.log import get_logger

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LAYERS_DIR = "layers"
_BITS_KEY = "mask_bits"
_SHAPE_KEY = "mask_shape"
_REQUIRED_STATS = ("tentative", "restored", "seconds")
# Entry fields the checkpoint derives itself; callers must not supply them in ``stats``.
_COMPUTED_FIELDS = ("file", "shape", "numel", "pruned", "sparsity", "sha256", "tensors")
_MANIFEST_KEYS = ("format_version", "model_fingerprint", "config", "config_hash", "layers", "order")
_FIX = "rerun with --restart to discard it, or choose another output directory"

logger = get_logger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was made for another model or another config."""


class CorruptCheckpointError(ValueError):
    """A manifest or layer file is unreadable, missing, or fails its checksum."""


# ----------------------------------------------------------------------------- helpers


def model_fingerprint(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{parameter name: {"shape": [...], "dtype": "float32"}}`` for every parameter.

    Pass the *unwrapped* model (``ddp.module``, ``engine.module``, or the model before
    ``fully_shard``): wrappers add name prefixes (``module.``) that would not match.
    ZeRO-3 partitions a parameter to shape ``[0]``; its full shape is read from ``ds_shape``.
    """
    return {
        name: {
            "shape": list(getattr(param, "ds_shape", param.shape)),
            "dtype": str(param.dtype).removeprefix("torch."),
        }
        for name, param in model.named_parameters()
    }


def _json_normalised(value: Any, what: str) -> Any:
    """The value as it will read back from JSON (tuples become lists), so resume compares equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what} must be JSON-serialisable (str, int, float, bool, None, list, dict); "
            f"convert it to such values first ({err})"
        ) from None


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config``: equal configs hash equal on any machine."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _layer_file_name(name: str) -> str:
    """A safe file name for a layer; names that had to be altered get a hash so they stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if safe != name or len(safe) > 200:
        safe = f"{safe[:200]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return f"{safe}.safetensors"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees either the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _remove_temp_files(directory: Path) -> None:
    """Temporary files left by a killed writer are never valid data."""
    for pattern in (".*.tmp", f"{LAYERS_DIR}/.*.tmp"):
        for leftover in directory.glob(pattern):
            leftover.unlink(missing_ok=True)


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A CPU BoolTensor as uint8, 1 bit per element, little-endian within each byte."""
    bits = np.packbits(mask.reshape(-1).numpy(), bitorder="little")
    return torch.from_numpy(bits)


def _unpack_mask(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64))
    flat = np.unpackbits(bits.numpy(), count=numel, bitorder="little").astype(bool)
    return torch.from_numpy(flat).reshape(shape)


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, allow_nan=False) + "\n").encode("utf-8")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a checkpoint, checked for the fields this module needs."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in '{directory}': it is not a mask checkpoint directory; "
            "check the path (a new checkpoint is created by MaskCheckpoint.open)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"'{path}' is not valid JSON ({err}); {_FIX}") from None
    missing = [key for key in _MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise CorruptCheckpointError(f"'{path}' lacks the field(s) {missing}; {_FIX}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"'{path}' has format_version {manifest['format_version']!r}, this code reads "
            f"{FORMAT_VERSION}; {_FIX}"
        )
    if sorted(manifest["order"]) != sorted(manifest["layers"]):
        raise CorruptCheckpointError(
            f"'{path}': 'order' and 'layers' list different layer names; {_FIX}"
        )
    return manifest


def _first_few(lines: list[str], limit: int = 5) -> list[str]:
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _config_differences(recorded: Mapping, current: Mapping) -> list[str]:
    """One sentence per config field whose value differs between the checkpoint and now."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key, ...) != current.get(key, ...):
            then = json.dumps(recorded[key]) if key in recorded else "missing"
            now = json.dumps(current[key]) if key in current else "missing"
            lines.append(f"config field '{key}' is {then} in the checkpoint but {now} now")
    return lines


def _fingerprint_differences(recorded: Mapping, current: Mapping) -> list[str]:
    """One sentence per parameter that was added, removed, or changed shape/dtype."""
    lines = [f"parameter '{name}' is in the checkpoint but not in the model now"
             for name in sorted(set(recorded) - set(current))]
    lines += [f"parameter '{name}' is in the model now but not in the checkpoint"
              for name in sorted(set(current) - set(recorded))]
    for name in sorted(set(recorded) & set(current)):
        for field in ("shape", "dtype"):
            then, now = recorded[name].get(field), current[name].get(field)
            if then != now:
                lines.append(f"parameter '{name}' has {field} {json.dumps(then)} in the "
                             f"checkpoint but {json.dumps(now)} now")
    return lines


# ----------------------------------------------------------------------------- checkpoint


class MaskCheckpoint:
    """One checkpoint directory: save a layer, list completed layers, load, verify."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any]):
        """Use :meth:`open` (check against a model and config) or :meth:`read` (inspect only)."""
        self.directory = Path(directory)
        self._manifest = manifest

    # --- construction -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        *,
        model_fingerprint: Mapping[str, Any],
        config: Mapping[str, Any],
        restart: bool = False,
    ) -> "MaskCheckpoint":
        """Create a checkpoint, or resume one made for the same model fingerprint and config.

        ``config`` holds only the settings that change masks; it must be JSON-serialisable.
        ``restart=True`` deletes an existing checkpoint's manifest and layer files first.
        """
        directory = Path(directory)
        fingerprint = _json_normalised(dict(model_fingerprint), "model_fingerprint")
        if not all(isinstance(info, dict) and "shape" in info for info in fingerprint.values()):
            raise TypeError(
                "model_fingerprint must map parameter names to {'shape': [...], 'dtype': ...}; "
                "build it with gradprobe_dist.checkpoint.store.model_fingerprint(model)"
            )
        config = _json_normalised(dict(config), "config")
        _remove_temp_files(directory)
        if restart:
            cls._discard(directory)
        elif (directory / MANIFEST_NAME).exists():
            checkpoint = cls.read(directory)
            checkpoint._check_matches(fingerprint, config)
            logger.info("resuming mask checkpoint %s: %d layer(s) done",
                        directory, len(checkpoint._manifest["order"]))
            return checkpoint
        (directory / LAYERS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": fingerprint,
            "config": config,
            "config_hash": config_hash(config),
            "layers": {},
            "order": [],
        }
        atomic_write(directory / MANIFEST_NAME, _manifest_bytes(manifest))
        return cls(directory, manifest)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "MaskCheckpoint":
        """An existing checkpoint, without checking it against a model (for inspect/load)."""
        return cls(directory, read_manifest(directory))

    @staticmethod
    def _discard(directory: Path) -> None:
        """Remove only what a checkpoint owns; the manifest first, so no half-deleted state is valid."""
        manifest = directory / MANIFEST_NAME
        if manifest.exists():
            logger.warning("--restart: discarding the mask checkpoint in %s", directory)
            manifest.unlink()
            _fsync_directory(directory)
        shutil.rmtree(directory / LAYERS_DIR, ignore_errors=True)

    def _check_matches(self, fingerprint: dict, config: dict) -> None:
        problems = _fingerprint_differences(self._manifest["model_fingerprint"], fingerprint)
        problems += _config_differences(self._manifest["config"], config)
        if problems:
            raise CheckpointMismatchError(
                f"the mask checkpoint in '{self.directory}' was made for another model or "
                f"config: " + "; ".join(_first_few(problems)) + f". To start over, {_FIX}."
            )

    # --- queries ------------------------------------------------------------------

    def completed(self) -> list[str]:
        """Layer names in completion order, after checking every layer file's checksum."""
        for name in self._manifest["order"]:
            self._verified_bytes(name)
        return list(self._manifest["order"])

    def layer_info(self, name: str) -> dict[str, Any]:
        """The manifest entry of one layer (a copy)."""
        return dict(self._entry(name))

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per layer, in completion order, for an ``inspect`` table."""
        return [
            {"name": name, **{key: self._manifest["layers"][name][key]
                              for key in ("shape", "tentative", "pruned", "restored", "sparsity")}}
            for name in self._manifest["order"]
        ]

    def load_layer(self, name: str) -> torch.Tensor:
        """The saved mask of one layer as a BoolTensor of its full shape (True = pruned)."""
        return self._load(name)[0]

    def copy_layer_from(self, source: "MaskCheckpoint", name: str) -> None:
        """Save ``source``'s layer ``name`` here: mask, stats and saved tensors unchanged."""
        info = source.layer_info(name)
        self.save_layer(name, source.load_layer(name), tensors=source.load_layer_tensors(name),
                        stats={k: v for k, v in info.items() if k not in _COMPUTED_FIELDS})

    def load_layer_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The extra tensors saved with a layer (``save_layer(..., tensors=...)``)."""
        return self._load(name)[1]

    # --- writing ------------------------------------------------------------------

    def save_layer(
        self,
        name: str,
        mask: torch.Tensor,
        *,
        stats: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record one decided layer: its file first, then the manifest that lists it.

        ``stats`` needs ``tentative``, ``restored`` (weight counts) and ``seconds``; any other
        JSON-serialisable keys are kept as extras. ``pruned`` and ``sparsity`` are computed
        from the mask. ``tensors`` (e.g. gradient ratios for plots) are stored alongside it.
        """
        tensors = dict(tensors or {})
        self._check_new_layer(name, mask, stats, tensors)
        stats = _json_normalised(dict(stats), f"stats for '{name}'")
        mask = mask.detach().cpu()
        shape = list(mask.shape)
        payload = {
            _BITS_KEY: _pack_mask(mask),
            _SHAPE_KEY: torch.tensor(shape, dtype=torch.int64),
            **{key: t.detach().cpu().contiguous() for key, t in tensors.items()},
        }
        data = safetensors_save(payload, metadata={"layer": name, "format_version": str(FORMAT_VERSION)})
        file = f"{LAYERS_DIR}/{_layer_file_name(name)}"
        atomic_write(self.directory / file, data)

        pruned = int(mask.sum())
        entry = {
            "file": file,
            "shape": shape,
            "numel": mask.numel(),
            "tentative": stats.pop("tentative"),
            "pruned": pruned,
            "restored": stats.pop("restored"),
            "sparsity": pruned / mask.numel() if mask.numel() else 0.0,
            "sha256": hashlib.sha256(data).hexdigest(),
            "seconds": stats.pop("seconds"),
            "tensors": sorted(tensors),
            **stats,
        }
        manifest = {
            **self._manifest,
            "layers": {**self._manifest["layers"], name: entry},
            "order": [*self._manifest["order"], name],
        }
        atomic_write(self.directory / MANIFEST_NAME, _manifest_bytes(manifest))
        self._manifest = manifest

    def _check_new_layer(self, name: str, mask: Any, stats: Mapping, tensors: dict) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"mask for '{name}' must be a torch.BoolTensor (True = pruned), got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}; convert it with mask.bool()"
            )
        if name in self._manifest["layers"]:
            raise ValueError(
                f"layer '{name}' is already saved in '{self.directory}'; skip layers listed "
                f"by completed(), or {_FIX}"
            )
        expected = self._manifest["model_fingerprint"].get(name)
        if expected is None:
            raise ValueError(
                f"'{name}' is not a parameter of the model this checkpoint was opened for; "
                "masks are keyed by parameter name from the unwrapped model's named_parameters()"
            )
        if list(mask.shape) != expected["shape"]:
            raise ValueError(
                f"mask for '{name}' has shape {list(mask.shape)} but the parameter has shape "
                f"{expected['shape']}; save the full (gathered) mask, not a shard"
            )
        missing = [key for key in _REQUIRED_STATS if key not in stats]
        if missing:
            raise ValueError(f"stats for '{name}' lack {missing}; pass them in stats=")
        computed = [key for key in _COMPUTED_FIELDS if key in stats]
        if computed:
            raise ValueError(
                f"stats for '{name}' contain {computed}, which the checkpoint computes itself; "
                "leave them out"
            )
        bad = [key for key, t in tensors.items()
               if key in (_BITS_KEY, _SHAPE_KEY) or not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(
                f"extra tensors for '{name}' named {bad} are not allowed: values must be "
                f"torch.Tensor and '{_BITS_KEY}', '{_SHAPE_KEY}' are reserved for the mask"
            )

    # --- reading ------------------------------------------------------------------

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._manifest["layers"]:
            raise ValueError(
                f"layer '{name}' is not in the checkpoint '{self.directory}'; "
                "completed() lists the saved layers"
            )
        return self._manifest["layers"][name]

    def _verified_bytes(self, name: str) -> bytes:
        """The layer file's bytes, refusing a missing file or one whose sha256 changed."""
        entry = self._entry(name)
        path = self.directory / entry["file"]
        fix = (
            f"{_FIX}, or delete the entry '{name}' from 'layers' and 'order' in "
            f"{self.directory / MANIFEST_NAME} to recompute only that layer"
        )
        if not path.is_file():
            raise CorruptCheckpointError(f"layer file '{path}' of layer '{name}' is missing; {fix}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptCheckpointError(
                f"layer file '{path}' of layer '{name}' ({len(data)} bytes) does not match its "
                f"recorded sha256: it is truncated or modified; {fix}"
            )
        return data

    def _load(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entry = self._entry(name)
        tensors = safetensors_load(self._verified_bytes(name))
        bits, shape = tensors.pop(_BITS_KEY), tensors.pop(_SHAPE_KEY).tolist()
        if shape != entry["shape"] or bits.numel() != -(-entry["numel"] // 8):
            raise CorruptCheckpointError(
                f"layer file '{self.directory / entry['file']}' holds a mask of shape {shape} "
                f"({bits.numel()} bytes) but the manifest records shape {entry['shape']}; {_FIX}"
            )
        return _unpack_mask(bits, shape), tensors


# ----------------------------------------------------------------------------- masks


def load_masks(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every saved mask of a checkpoint, by parameter name, in completion order."""
    checkpoint = MaskCheckpoint.read(directory)
    return {name: checkpoint.load_layer(name) for name in checkpoint._manifest["order"]}


def apply_masks(
    model: nn.Module, directory_or_masks: str | os.PathLike | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Zero the masked weights of ``model`` in place; returns the masks applied.

    ``model`` must be unwrapped and unsharded (plain tensors, names without ``module.``).
    Every name and shape is checked before any weight changes.
    """
    if isinstance(directory_or_masks, (str, os.PathLike)):
        masks = load_masks(directory_or_masks)
    else:
        masks = dict(directory_or_masks)
    params = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(
            f"masks name parameters the model does not have: {unknown}; pass the unwrapped "
            "model the masks were computed for"
        )
    wrong = [
        f"'{name}' (mask {getattr(mask, 'dtype', type(mask).__name__)} "
        f"{list(getattr(mask, 'shape', []))}, parameter {list(params[name].shape)})"
        for name, mask in masks.items()
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
        or mask.shape != params[name].shape
    ]
    if wrong:
        raise ValueError(
            "masks must be BoolTensors of their parameter's shape; these are not: "
            + ", ".join(wrong) + "; pass the masks computed for this model"
        )
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].masked_fill_(mask.to(params[name].device), 0)
    return masks
