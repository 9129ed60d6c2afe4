"""Per-layer mask checkpoint: each layer's mask is saved the moment it is decided, so a
killed job resumes where it stopped instead of re-probing the whole model.

Layout of a checkpoint directory::

    manifest.json                 what is done, for which model and which config (format.py)
    layers/<name>.safetensors     one mask per weight, 1 bit per element (masks.py)

Crash safety: every file is written atomically (files.py). The layer file goes first and
the manifest last, so the manifest only ever lists layers whose files are complete; a crash
at any point leaves the previous manifest valid. The checkpoint only ever deletes files its
manifest names: a directory that holds other files and no manifest is refused.

Masks are keyed by *parameter* name (``model.named_parameters()`` of the unwrapped model,
e.g. ``"h.0.attn.c_attn.weight"``); True means pruned.

This class is rank-agnostic: it writes whenever asked. In a distributed run only the main
rank creates, saves into or restarts a checkpoint (``relay.RankZeroCheckpoint``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from gradprobe_dist.checkpoint.files import atomic_write, fsync_directory, remove_temp_files
from gradprobe_dist.checkpoint.format import (COMPUTED_FIELDS, FIX, FORMAT_VERSION, LAYERS_DIR,
                                              MANIFEST_NAME, OWN_FILES, PLANNED_KEY, REQUIRED_STATS,
                                              STAGE_KEY, CheckpointMismatchError,
                                              CorruptCheckpointError, PartialCheckpointError,
                                              config_differences, config_hash,
                                              fingerprint_differences, first_few, json_normalised,
                                              manifest_bytes, read_manifest)
from gradprobe_dist.checkpoint.lock import LOCK_NAME
from gradprobe_dist.checkpoint.masks import (BITS_KEY, SHAPE_KEY, decode_layer, encode_layer,
                                             layer_file_name, unpack_mask)
from gradprobe_dist.runtime.log import get_logger

logger = get_logger(__name__)


def foreign_files(directory: Path) -> list[str]:
    """Files in ``directory`` that no checkpoint wrote (it has no manifest to name them)."""
    if not directory.is_dir():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != LOCK_NAME)


def refuse_foreign(directory: Path) -> None:
    """Refuse a directory without a manifest that holds files: they are someone else's."""
    found = foreign_files(directory)
    if found:
        raise ValueError(
            f"'{directory}' is not a mask checkpoint (no {MANIFEST_NAME}) but holds "
            f"{len(found)} file(s), e.g. '{found[0]}': a prune writes only into a new, an "
            "empty or a checkpoint directory, and --restart deletes only what a checkpoint's "
            "manifest names; choose another output_dir, or move those files away"
        )


def discard(directory: Path) -> None:
    """Delete the files the manifest names, then the manifest: a crash in between leaves a
    manifest whose missing files fail their checks, never a half-deleted valid state."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        return
    logger.warning("--restart: discarding the mask checkpoint in %s", directory)
    try:
        entries = read_manifest(directory)["layers"].values()
    except (CorruptCheckpointError, CheckpointMismatchError):
        entries = []  # unreadable: its layer files are overwritten as layers are saved again
    for entry in entries:
        (directory / entry["file"]).unlink(missing_ok=True)
    path.unlink()
    fsync_directory(directory)


def check_new_layer(manifest: dict, directory: Path, name: str, mask: Any, stats: Mapping,
                    tensors: dict) -> None:
    """Refuse a layer that cannot be saved, before anything is written."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask for '{name}' must be a torch.BoolTensor (True = pruned), got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}; convert it with mask.bool()"
        )
    if name in manifest["layers"]:
        raise ValueError(
            f"layer '{name}' is already saved in '{directory}'; skip layers listed "
            f"by completed(), or {FIX}"
        )
    expected = manifest["model_fingerprint"].get(name)
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
    missing = [key for key in REQUIRED_STATS if key not in stats]
    if missing:
        raise ValueError(f"stats for '{name}' lack {missing}; pass them in stats=")
    computed = [key for key in COMPUTED_FIELDS if key in stats]
    if computed:
        raise ValueError(
            f"stats for '{name}' contain {computed}, which the checkpoint computes itself; "
            "leave them out"
        )
    bad = [key for key, t in tensors.items()
           if key in (BITS_KEY, SHAPE_KEY) or not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(
            f"extra tensors for '{name}' named {bad} are not allowed: values must be "
            f"torch.Tensor and '{BITS_KEY}', '{SHAPE_KEY}' are reserved for the mask"
        )


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
        planned: list[str] | None = None,
    ) -> "MaskCheckpoint":
        """Create a checkpoint, or resume one made for the same model fingerprint and config.

        ``config`` holds only the settings that change masks; it must be JSON-serialisable.
        ``planned`` lists the layers a complete checkpoint holds (so eval and inspect can
        refuse a partial one). ``restart=True`` deletes an existing checkpoint's files first.
        """
        directory = Path(directory)
        fingerprint = json_normalised(dict(model_fingerprint), "model_fingerprint")
        if not all(isinstance(info, dict) and "shape" in info for info in fingerprint.values()):
            raise TypeError(
                "model_fingerprint must map parameter names to {'shape': [...], 'dtype': ...}; "
                "build it with gradprobe_dist.checkpoint.model_fingerprint(model)"
            )
        config = json_normalised(dict(config), "config")
        if not (directory / MANIFEST_NAME).exists():
            refuse_foreign(directory)
        remove_temp_files(directory, list(OWN_FILES))
        if restart:
            discard(directory)
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
            **({PLANNED_KEY: list(planned)} if planned is not None else {}),
            "layers": {},
            "order": [],
        }
        atomic_write(directory / MANIFEST_NAME, manifest_bytes(manifest))
        return cls(directory, manifest)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "MaskCheckpoint":
        """An existing checkpoint, without checking it against a model (for inspect/load)."""
        return cls(directory, read_manifest(directory))

    def _check_matches(self, fingerprint: dict, config: dict) -> None:
        problems = fingerprint_differences(self._manifest["model_fingerprint"], fingerprint)
        problems += config_differences(self._manifest["config"], config)
        if problems:
            raise CheckpointMismatchError(
                f"the mask checkpoint in '{self.directory}' was made for another model or "
                f"config: " + "; ".join(first_few(problems)) + f". To start over, {FIX}."
            )

    # --- queries ------------------------------------------------------------------

    def completed(self) -> list[str]:
        """Layer names in completion order, after checking every layer file's checksum."""
        for name in self._manifest["order"]:
            self._verified_bytes(name)
        return list(self._manifest["order"])

    def missing(self, planned: list[str] | None = None) -> list[str] | None:
        """Layers of ``planned`` (default: what the writer planned) not saved yet; None if
        neither says what a complete checkpoint holds."""
        planned = self._manifest.get(PLANNED_KEY) if planned is None else planned
        if planned is None:
            return None
        return [name for name in planned if name not in self._manifest["layers"]]

    def check_complete(self, planned: list[str] | None = None) -> None:
        """Refuse an empty checkpoint, or one that lacks planned layers: using it would
        silently leave those weights dense."""
        missing, saved = self.missing(planned) or [], len(self._manifest["order"])
        if saved and not missing:
            return
        what = (f"{len(missing)} of its {len(missing) + saved} layers are missing (e.g. "
                f"'{missing[0]}')" if missing else "it holds no layers")
        raise PartialCheckpointError(
            f"the mask checkpoint '{self.directory}' is partial: {what}; finish it by rerunning "
            "the prune that writes it (it resumes), or pass --allow-partial to use it as it is"
        )

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
        check_new_layer(self._manifest, self.directory, name, mask, stats, tensors)
        stats = json_normalised(dict(stats), f"stats for '{name}'")
        mask = mask.detach().cpu()
        data = encode_layer(name, mask, tensors)
        file = f"{LAYERS_DIR}/{layer_file_name(name)}"
        atomic_write(self.directory / file, data)

        pruned = int(mask.count_nonzero())
        entry = {
            "file": file,
            "shape": list(mask.shape),
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
        self._write_manifest({
            **self._manifest,
            "layers": {**self._manifest["layers"], name: entry},
            "order": [*self._manifest["order"], name],
        })

    def copy_layer_from(self, source: "MaskCheckpoint", name: str) -> None:
        """Save ``source``'s layer ``name`` here: mask, stats and saved tensors unchanged."""
        info = source.layer_info(name)
        self.save_layer(name, source.load_layer(name), tensors=source.load_layer_tensors(name),
                        stats={k: v for k, v in info.items() if k not in COMPUTED_FIELDS})

    def drop_stages_from(self, stage: int) -> list[str]:
        """Forget every layer written by stage ``stage`` (0-based) or a later one: the
        manifest first, then their files. Returns the names dropped."""
        dropped = [n for n in self._manifest["order"]
                   if self._manifest["layers"][n].get(STAGE_KEY, stage) >= stage]
        files = [self._manifest["layers"][n]["file"] for n in dropped]
        self._write_manifest({
            **self._manifest,
            "layers": {n: e for n, e in self._manifest["layers"].items() if n not in dropped},
            "order": [n for n in self._manifest["order"] if n not in dropped],
        })
        for file in files:
            (self.directory / file).unlink(missing_ok=True)
        return dropped

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write(self.directory / MANIFEST_NAME, manifest_bytes(manifest))
        self._manifest = manifest

    # --- reading ------------------------------------------------------------------

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._manifest["layers"]:
            raise ValueError(
                f"layer '{name}' is not in the checkpoint '{self.directory}'; "
                "completed() lists the saved layers"
            )
        return self._manifest["layers"][name]

    def _recovery(self, name: str) -> str:
        """How to recover from a bad layer file. The stage is the unit of recovery: probing
        one layer again on a network whose later stages are already pruned would give other
        masks than an uninterrupted run, so its stage and every later one are redone."""
        stage = self._entry(name).get(STAGE_KEY)
        if stage is None:
            return FIX
        return (f"rerun the prune with --redo-from-stage {stage + 1} to recompute stage "
                f"{stage + 1} (this layer's) and every later one, keeping the earlier stages, "
                f"or {FIX}")

    def _verified_bytes(self, name: str) -> bytes:
        """The layer file's bytes, refusing a missing file or one whose sha256 changed."""
        entry = self._entry(name)
        path = self.directory / entry["file"]
        if not path.is_file():
            raise CorruptCheckpointError(
                f"layer file '{path}' of layer '{name}' is missing; {self._recovery(name)}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptCheckpointError(
                f"layer file '{path}' of layer '{name}' ({len(data)} bytes) does not match its "
                f"recorded sha256: it is truncated or modified; {self._recovery(name)}"
            )
        return data

    def _load(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entry = self._entry(name)
        bits, shape, tensors = decode_layer(self._verified_bytes(name))
        if shape != entry["shape"] or bits.numel() != -(-entry["numel"] // 8):
            raise CorruptCheckpointError(
                f"layer file '{self.directory / entry['file']}' holds a mask of shape {shape} "
                f"({bits.numel()} bytes) but the manifest records shape {entry['shape']}; {FIX}"
            )
        return unpack_mask(bits, shape), tensors


def load_masks(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every saved mask of a checkpoint, by parameter name, in completion order."""
    checkpoint = MaskCheckpoint.read(directory)
    return {name: checkpoint.load_layer(name) for name in checkpoint._manifest["order"]}
