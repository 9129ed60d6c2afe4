"""What a mask checkpoint's ``manifest.json`` holds, and how a resume compares it with now.

The manifest records the format version, the model's fingerprint (every parameter's shape and
dtype, and a sha256 of each prunable weight's bytes), the mask-changing config and its hash,
the layers planned, and one entry per saved layer (its file, counts, checksum and the
writer's stats) in completion order.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LAYERS_DIR = "layers"
#: the patterns of every file a checkpoint writes (temporary files of a killed writer included)
OWN_FILES = (MANIFEST_NAME, f"{LAYERS_DIR}/*.safetensors")
REQUIRED_STATS = ("tentative", "restored", "seconds")
#: entry fields the checkpoint derives itself; callers must not supply them in ``stats``
COMPUTED_FIELDS = ("file", "shape", "numel", "pruned", "sparsity", "sha256", "tensors")
MANIFEST_KEYS = ("format_version", "model_fingerprint", "config", "config_hash", "layers", "order")
#: optional manifest field: the layer names a complete checkpoint holds
PLANNED_KEY = "planned"
#: name of the saved tensor holding a layer's gradient ratios (for plots)
RATIO_KEY = "ratio"
#: entry stats: the stage (0-based) and round that wrote a layer, and the weights pruned
#: before the probe that wrote the ratios (iterative rounds only)
STAGE_KEY = "stage"
ROUND_KEY = "round"
CARRIED_KEY = "carried"
#: the extra tensor holding a layer's weights as SparseGPT / reconstruction left them
UPDATED_WEIGHT_KEY = "weight"
FIX = "rerun with --restart to discard it, or choose another output directory"


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was made for another model or another config."""


class CorruptCheckpointError(ValueError):
    """A manifest or layer file is unreadable, missing, or fails its checksum."""


class PartialCheckpointError(ValueError):
    """The checkpoint lacks layers a complete one holds (its job has not finished)."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (any dtype): equal weights hash equal on any machine.
    0.17 GB/s was measured on one heavily shared CPU core (about 6 s per GB of weights)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def model_fingerprint(model: nn.Module, weight_sha256: Mapping[str, str] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """``{parameter name: {"shape": [...], "dtype": "float32"}}`` for every parameter, plus
    ``"sha256"`` where ``weight_sha256`` gives one (the prunable weights', from
    ``tensor_sha256``: a model retrained into the same path must not resume old masks).

    Pass the *unwrapped* model (``ddp.module``, ``engine.module``, or the model before
    ``fully_shard``): wrappers add name prefixes (``module.``) that would not match.
    ZeRO-3 partitions a parameter to shape ``[0]``; its full shape is read from ``ds_shape``.
    """
    weight_sha256 = weight_sha256 or {}
    return {
        name: {
            "shape": list(getattr(param, "ds_shape", param.shape)),
            "dtype": str(param.dtype).removeprefix("torch."),
            **({"sha256": weight_sha256[name]} if name in weight_sha256 else {}),
        }
        for name, param in model.named_parameters()
    }


def json_normalised(value: Any, what: str) -> Any:
    """The value as it will read back from JSON (tuples become lists), so resume compares equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{what} must be JSON-serialisable (str, int, float, bool, None, list, dict); "
            f"convert it to such values first ({err})"
        ) from None


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config``: equal configs hash equal on any machine.
    The one config hash: the manifest records it, ``gradprobe validate`` prints it."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Compact JSON: the manifest is rewritten after every layer, and only compact output
    takes json's C encoder (indented output cost 22% of a 10 M LLaMA's whole prune job);
    ``gradprobe inspect`` is the readable view."""
    return (json.dumps(manifest, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a checkpoint, checked for the fields this package needs."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in '{directory}': it is not a mask checkpoint directory; "
            "check the path (a new checkpoint is created by MaskCheckpoint.open)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"'{path}' is not valid JSON ({err}); {FIX}") from None
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise CorruptCheckpointError(f"'{path}' lacks the field(s) {missing}; {FIX}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"'{path}' has format_version {manifest['format_version']!r}, this code reads "
            f"{FORMAT_VERSION}; {FIX}"
        )
    if sorted(manifest["order"]) != sorted(manifest["layers"]):
        raise CorruptCheckpointError(
            f"'{path}': 'order' and 'layers' list different layer names; {FIX}"
        )
    return manifest


def first_few(lines: list[str], limit: int = 5) -> list[str]:
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def config_differences(recorded: Mapping, current: Mapping) -> list[str]:
    """One sentence per config field whose value differs between the checkpoint and now."""
    lines = []
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key, ...) != current.get(key, ...):
            then = json.dumps(recorded[key]) if key in recorded else "missing"
            now = json.dumps(current[key]) if key in current else "missing"
            lines.append(f"config field '{key}' is {then} in the checkpoint but {now} now")
    return lines


def fingerprint_differences(recorded: Mapping, current: Mapping) -> list[str]:
    """One sentence per parameter that was added, removed, or changed shape, dtype or weights."""
    lines = [f"parameter '{name}' is in the checkpoint but not in the model now"
             for name in sorted(set(recorded) - set(current))]
    lines += [f"parameter '{name}' is in the model now but not in the checkpoint"
              for name in sorted(set(current) - set(recorded))]
    for name in sorted(set(recorded) & set(current)):
        changed = [f"parameter '{name}' has {field} {json.dumps(recorded[name].get(field))} in "
                   f"the checkpoint but {json.dumps(current[name].get(field))} now"
                   for field in ("shape", "dtype")
                   if recorded[name].get(field) != current[name].get(field)]
        lines += changed
        then, now = recorded[name].get("sha256"), current[name].get("sha256")
        if then != now and not changed:
            lines.append(f"parameter '{name}' holds other weights than the checkpoint was made "
                         f"from (sha256 {str(then)[:12]} then, {str(now)[:12]} now: the model "
                         "was retrained or replaced)")
    return lines
